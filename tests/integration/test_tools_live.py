"""Tools and reasoning against live servers on SmolLM2, with the official openai SDK: its own template
(ChatML: the generic tool format) and Qwen3's template (tests/data/templates/qwen3.jinja, served with
--chat-template). The grammar makes even this tiny model return schema-valid calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from bindings.grammar import tool_call_grammar
from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.protocol import BackendError, SamplingParams
from registry.models import resolve_model
from tests.integration.conftest import CacheHome, LiveServer, start_server, stop_server

MODEL = "smollm2-135m-instruct"
QWEN3_TEMPLATE = Path(__file__).parent.parent / "data" / "templates" / "qwen3.jinja"

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 12}},
    "required": ["timezone"],
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen3_template_server(tmp_path_factory: pytest.TempPathFactory, live_cache_home: CacheHome) -> Iterator[LiveServer]:
    """SmolLM2 rendered through Qwen3's chat template (tools in the template's own format)."""
    log_path = tmp_path_factory.mktemp("qwen3-template") / "server.log"
    args = ["--model", MODEL, "--chat-template", str(QWEN3_TEMPLATE), "--parallel", "2", "--ctx-size", "2048"]
    server = start_server([*args, "--threads", "2"], log_path, live_cache_home)
    yield server
    stop_server(server)


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


def create(server: LiveServer, **fields: Any) -> Any:
    request = {"model": MODEL, "messages": QUESTION, "tools": TOOLS, "temperature": 0, "seed": 7, "max_tokens": 160}
    return client(server).chat.completions.create(**{**request, **fields})


def streamed_calls(server: LiveServer, **fields: Any) -> tuple[list[dict[str, Any]], str | None, str]:
    """The calls of a streamed answer, put together from their deltas as the OpenAI docs show."""
    calls: dict[int, dict[str, Any]] = {}
    finish_reason = None
    content = ""
    for chunk in create(server, stream=True, **fields):
        for choice in chunk.choices:
            finish_reason = choice.finish_reason or finish_reason
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                assert delta.function is not None
                if delta.id is not None:
                    assert call["id"] is None and delta.type == "function" and delta.function.arguments == ""
                    call["id"] = delta.id
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    return [calls[index] for index in sorted(calls)], finish_reason, content


def assert_valid_call(name: str, arguments: str) -> dict[str, Any]:
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, SCHEMAS[name])
    return dict(parsed)


@pytest.mark.parametrize(
    ("server_name", "fields"),
    [
        ("qwen3_template_server", {"tool_choice": "required", "parallel_tool_calls": False}),
        (
            "smollm2_server",
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}, "parallel_tool_calls": False},
        ),
    ],
    ids=["required-qwen3-template", "named-generic-format"],
)
def test_forced_calls_are_schema_valid_and_streaming_matches(
    server_name: str, fields: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    server: LiveServer = request.getfixturevalue(server_name)
    fields = {**fields, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    # Greedy answers are reproducible for the same prompt-cache state: once the prompt has been seen (the
    # first request), the next ones all reuse its cached prefix.
    first = create(server, **fields).choices[0]
    calls, finish_reason, content = streamed_calls(server, **fields)
    choice = create(server, **fields).choices[0]
    for answer in (first, choice):
        assert answer.finish_reason == "tool_calls", answer
        assert answer.message.tool_calls
        for call in answer.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            assert_valid_call(call.function.name, call.function.arguments)
            if isinstance(fields["tool_choice"], dict):
                assert call.function.name == "get_time"
    assert finish_reason == "tool_calls" and content == (choice.message.content or "")
    assert choice.message.tool_calls is not None
    assert [(call["name"], call["arguments"]) for call in calls] == [
        (call.function.name, call.function.arguments) for call in choice.message.tool_calls
    ]


def test_one_call_without_parallel_tool_calls(smollm2_server: LiveServer) -> None:
    completion = create(smollm2_server, tool_choice="required", parallel_tool_calls=False, temperature=1.0, n=2)
    for choice in completion.choices:
        calls = choice.message.tool_calls
        assert calls is not None and len(calls) == 1
        assert_valid_call(calls[0].function.name, calls[0].function.arguments)


def test_follow_up_turn_with_the_tool_result(qwen3_template_server: LiveServer) -> None:
    server = qwen3_template_server
    first = create(server, tool_choice="required", parallel_tool_calls=False).choices[0].message
    assert first.tool_calls is not None
    call = first.tool_calls[0]
    messages = [
        *QUESTION,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    answer = create(server, messages=messages, tool_choice="none", max_tokens=40).choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.tool_calls is None and isinstance(answer.message.content, str) and answer.message.content


def test_auto_answers_with_text_or_valid_calls(smollm2_server: LiveServer) -> None:
    for choice in create(smollm2_server, tool_choice="auto", temperature=0.8, n=3, max_tokens=60).choices:
        assert "<tool_call>" not in (choice.message.content or "")
        for call in choice.message.tool_calls or []:
            if choice.finish_reason == "tool_calls":
                assert_valid_call(call.function.name, call.function.arguments)


def test_the_qwen3_template_shows_smollm2_the_tools_and_thinking_switch(qwen3_template_server: LiveServer) -> None:
    """The prompt SmolLM2 gets through Qwen3's template (POST /tokenize shows it; special tokens' pieces are
    empty), and how much tools and enable_thinking add to it."""
    with httpx.Client(base_url=qwen3_template_server.base_url) as http:
        body = {"messages": QUESTION, "with_pieces": True}
        pieces = http.post("/tokenize", json=body).json()["tokens"]
    text = "".join(piece["piece"] for piece in pieces if isinstance(piece["piece"], str))
    assert text == "user\nWhat is the weather in Paris?\nassistant\n"  # Qwen3's layout: no default system prompt
    completion = create(
        qwen3_template_server, tools=None, max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    thinking_off = completion.usage.prompt_tokens
    completion = create(qwen3_template_server, tools=None, max_tokens=4)
    assert thinking_off > completion.usage.prompt_tokens  # the empty <think></think> block was added
    with_tools = create(qwen3_template_server, tool_choice="auto", max_tokens=4).usage.prompt_tokens
    assert with_tools > completion.usage.prompt_tokens + 100  # the <tools> block of the system message


def test_bad_tool_schema_is_a_400_naming_the_tool(smollm2_server: LiveServer) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": 1}}}]
    with pytest.raises(openai.BadRequestError) as caught:
        create(smollm2_server, tools=tools, tool_choice="required")
    assert "tools[0] (f)" in str(caught.value) and "minProperties" in str(caught.value)


@pytest.mark.parametrize("reasoning", ["", "open", "optional"])
@pytest.mark.parametrize("lazy", [False, True], ids=["strict", "lazy"])
def test_every_tool_grammar_variant_compiles_in_llama_cpp(reasoning: str, lazy: bool) -> None:
    """llama.cpp parses each grammar the API can build (a grammar it rejects would fail the request's batch)."""
    grammar = tool_call_grammar(
        [(tool["function"]["name"], tool["function"]["parameters"]) for tool in TOOLS],
        open_tag="<tool_call>",
        close_tag="</tool_call>",
        parallel=not lazy,
        reasoning=reasoning,
    )
    config = LlamaBackendConfig(n_slots=1, n_ctx_per_slot=256, n_batch=64, n_ubatch=64, n_threads=1)
    backend = LlamaBackend(resolve_model(MODEL).path, config, name=MODEL)
    try:
        backend.new_sampler(0, SamplingParams(grammar=grammar, grammar_triggers=("<tool_call>",) if lazy else ()))
        broken = grammar.replace("tool-call ::=", "tool-call ::= (")
        with pytest.raises(BackendError, match="grammar"):
            backend.new_sampler(1, SamplingParams(grammar=broken))
    finally:
        backend.close()
