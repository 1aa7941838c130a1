"""Tools on /v1/chat/completions over the FakeBackend: a scripted answer parsed into tool calls (streamed
and not), the grammar each tool_choice hands the sampler, tools and tool history through the templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.engine.fake_backend import CONTROL_TEXT, FakeBackend, FakeBackendConfig
from tests.api.helpers import MODEL, assert_openai_error, serve, sse_payloads

pytestmark = pytest.mark.anyio

QWEN3_TEMPLATE = Path(__file__).parent.parent / "data" / "templates" / "qwen3.jinja"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
SECOND_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def scripted(script: str) -> FakeBackendConfig:
    """A fake that answers `script`, with room for prompts that describe tools (one token per byte)."""
    return FakeBackendConfig(script=script, n_ctx_per_slot=4096, n_batch=512)


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "max_tokens": 200,
    }
    body.update(fields)
    return body


def prompt_of(backend: FakeBackend) -> str:
    """The text of the prompt the fake decoded for the first request: its prefill chunks, up to the one
    whose logits are sampled."""
    slot = backend.batches[0][0].slot
    tokens: list[int] = []
    for entry in (entry for batch in backend.batches for entry in batch if entry.slot == slot):
        tokens += entry.tokens
        if entry.logits_last:
            break
    return "".join(CONTROL_TEXT.get(token, chr(token)) for token in tokens)


def streamed_message(payloads: list[Any]) -> tuple[dict[str, Any], list[dict[str, Any]], str | None]:
    """Fold streamed chunks as OpenAI clients do: (message, the deltas, finish_reason)."""
    deltas = [chunk["choices"][0]["delta"] for chunk in payloads[:-1] if chunk["choices"]]
    finish = [chunk["choices"][0]["finish_reason"] for chunk in payloads[:-1] if chunk["choices"]][-1]
    content = "".join(delta.get("content") or "" for delta in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"function": {"name": "", "arguments": ""}})
            for key in ("id", "type"):
                if key in call:
                    entry[key] = call[key]
            entry["function"]["name"] += call["function"].get("name", "")
            entry["function"]["arguments"] += call["function"].get("arguments", "")
    message = {"content": content or None, "tool_calls": [calls[index] for index in sorted(calls)]}
    return message, deltas, finish


async def test_required_call_parsed_into_tool_calls_with_a_strict_grammar() -> None:
    async with serve(scripted(CALL)) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(tool_choice="required"))
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        message = choice["message"]
        assert message["content"] is None
        (call,) = message["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}
        (grammar,) = served.backend.grammars
        assert served.backend.grammar_triggers == [()]  # enforced from the first token
        assert '"\\"get_weather\\""' in grammar and '"\\"get_time\\""' in grammar
        assert 'tool-call ( "\\n" tool-call )*' in grammar  # parallel calls allowed by default


async def test_streamed_call_follows_openai_and_matches_the_non_streamed_one() -> None:
    async with serve(scripted("Checking.\n" + CALL + "\n" + SECOND_CALL)) as served:
        body = await served.client.post("/v1/chat/completions", json=chat())
        expected = body.json()["choices"][0]
        response = await served.client.post("/v1/chat/completions", json=chat(stream=True))
        payloads = sse_payloads(response.text)
        assert payloads[-1] == "[DONE]"
        message, deltas, finish = streamed_message(payloads)
    assert finish == expected["finish_reason"] == "tool_calls"
    assert deltas[0]["role"] == "assistant"
    assert message["content"] == expected["message"]["content"] == "Checking."
    assert not any("<" in (delta.get("content") or "") for delta in deltas)  # no partial tag leaked
    starts = [call for delta in deltas for call in delta.get("tool_calls", []) if "id" in call]
    assert [start["index"] for start in starts] == [0, 1]
    assert all(start["function"]["arguments"] == "" and start["type"] == "function" for start in starts)
    fragments = [call for delta in deltas for call in delta.get("tool_calls", []) if "id" not in call]
    assert len(fragments) > 2 and all(set(fragment) == {"index", "function"} for fragment in fragments)
    for streamed, whole in zip(message["tool_calls"], expected["message"]["tool_calls"], strict=True):
        assert streamed["function"] == whole["function"]


async def test_auto_uses_a_lazy_grammar_and_plain_text_stays_content() -> None:
    async with serve(scripted("No tool needed.")) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(tool_choice="auto"))
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["message"] == {"role": "assistant", "content": "No tool needed."}
        assert served.backend.grammar_triggers == [("<tool_call>",)]


async def test_none_renders_no_tools_and_parses_no_call() -> None:
    async with serve(scripted(CALL), chat_template=str(QWEN3_TEMPLATE)) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(tool_choice="none"))
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == CALL
        assert "tool_calls" not in choice["message"]
        assert served.backend.grammars == []
        assert "<tools>" not in prompt_of(served.backend)


async def test_parallel_tool_calls_false_allows_one_call() -> None:
    async with serve(scripted(CALL + "\n" + SECOND_CALL)) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(parallel_tool_calls=False))
        calls = response.json()["choices"][0]["message"]["tool_calls"]
        assert [call["function"]["name"] for call in calls] == ["get_weather"]
        assert "tool-call (" not in served.backend.grammars[0]


async def test_named_function_grammar_holds_only_that_function() -> None:
    async with serve(scripted(SECOND_CALL)) as served:
        named = {"type": "function", "function": {"name": "get_time"}}
        response = await served.client.post("/v1/chat/completions", json=chat(tool_choice=named))
        assert response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
        (grammar,) = served.backend.grammars
        assert '"\\"get_time\\""' in grammar and "get_weather" not in grammar
        assert "tool-call (" not in grammar  # one call: forcing a function asks for that call, once


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (
            {"tools": [TIME_TOOL, {"type": "function", "function": {"name": "f", "parameters": {"minimum": 1}}}]},
            "tools",
            "tools[1] (f)",
        ),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": [TIME_TOOL, TIME_TOOL]}, "tools", "get_time"),
        ({"response_format": {"type": "json_object"}}, "response_format", "tools"),
        ({"tool_choice": "sometimes"}, "tool_choice", ""),
    ],
)
async def test_bad_tool_requests_are_400_naming_the_problem(fields: dict[str, Any], param: str, words: str) -> None:
    async with serve(scripted("")) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(**fields))
        error = assert_openai_error(response, 400, param=param)
        assert words in error["message"]


async def test_qwen3_template_renders_tools_and_tool_history() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    ]
    async with serve(scripted("It is sunny."), chat_template=str(QWEN3_TEMPLATE)) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(messages=history))
        assert response.json()["choices"][0]["message"]["content"] == "It is sunny."
        prompt = prompt_of(served.backend)
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n" + json.dumps(TIME_TOOL) + "\n</tools>" in prompt
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<|im_start|>user\n<tool_response>\n22 C, sunny\n</tool_response><|im_end|>" in prompt


async def test_chatml_gets_the_generic_tool_format() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "22 C"},
    ]
    async with serve(scripted("Sunny.")) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(messages=history))
        assert response.status_code == 200, response.text
        prompt = prompt_of(served.backend)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER_TOOL) in prompt and "<tool_call></tool_call> XML tags" in prompt
    assert (
        '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\n22 C\n</tool_response><|im_end|>" in prompt


async def test_every_choice_parses_its_own_calls() -> None:
    async with serve(scripted(CALL)) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(n=2, tool_choice="required"))
        choices = response.json()["choices"]
        assert [choice["finish_reason"] for choice in choices] == ["tool_calls", "tool_calls"]
        ids = {choice["message"]["tool_calls"][0]["id"] for choice in choices}
        assert len(ids) == 2


OPENING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.mark.parametrize(
    ("config", "settings", "variables", "think_rule"),
    [
        (scripted(CALL), {"chat_template": str(QWEN3_TEMPLATE)}, {}, 'think ::= ( "<think>"'),
        (scripted(CALL), {"chat_template": str(QWEN3_TEMPLATE)}, {"enable_thinking": False}, None),
        (scripted(CALL), {}, {}, None),
        (
            FakeBackendConfig(
                script="hm</think>" + CALL, chat_template=OPENING_TEMPLATE, n_ctx_per_slot=4096, n_batch=512
            ),
            {},
            {},
            "think ::= think-text",
        ),
    ],
    ids=["qwen3-may-think", "qwen3-thinking-off", "chatml", "template-opened-think"],
)
async def test_forced_calls_may_follow_a_think_block(
    config: FakeBackendConfig, settings: dict[str, Any], variables: dict[str, Any], think_rule: str | None
) -> None:
    async with serve(config, **settings) as served:
        body = chat(tool_choice="required", chat_template_kwargs=variables)
        message = (await served.client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
        assert message["tool_calls"][0]["function"]["name"] == "get_weather"
        (grammar,) = served.backend.grammars
    if think_rule is None:
        assert "think" not in grammar and grammar.endswith('root ::= tool-call ( "\\n" tool-call )*')
    else:
        assert think_rule in grammar and "root ::= think tool-call" in grammar
    if config.chat_template == OPENING_TEMPLATE:
        assert message["reasoning_content"] == "hm"


@pytest.mark.parametrize(
    "parameters",
    [
        {"required": 5},
        {"required": [1]},
        {"$defs": []},
        {"additionalProperties": 3},
        {"anyOf": "x"},
        {"enum": 3},
        {"type": ["object", 1]},
        {"type": {"a": 1}},
        {"format": ["date"]},
        {"type": "string", "maxLength": -1},
        {"$ref": "#/nope"},
    ],
)
async def test_malformed_schemas_are_400_not_500(parameters: dict[str, Any]) -> None:
    """A schema is untrusted input: a malformed one is refused by name, on tools and response_format alike."""
    async with serve(scripted("")) as served:
        tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
        for choice in ("required", "auto"):
            response = await served.client.post("/v1/chat/completions", json=chat(tools=[tool], tool_choice=choice))
            assert "tools[0] (f): function.parameters" in assert_openai_error(response, 400, param="tools")["message"]
        response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": parameters}}
        response = await served.client.post(
            "/v1/chat/completions", json=chat(tools=None, response_format=response_format)
        )
        assert_openai_error(response, 400, param="response_format")
