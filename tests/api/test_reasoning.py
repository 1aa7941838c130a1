"""Reasoning on /v1/chat/completions over the FakeBackend: <think> blocks split into reasoning_content
(streamed and not), --reasoning-format and the per-request override, chat_template_kwargs reaching the
template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.engine.fake_backend import CHATML_TEMPLATE, FakeBackendConfig
from tests.api.helpers import MODEL, serve, sse_payloads
from tests.api.test_tools import prompt_of, scripted

pytestmark = pytest.mark.anyio

QWEN3_TEMPLATE = str(Path(__file__).parent.parent / "data" / "templates" / "qwen3.jinja")
# A thinking-only template in the style of Qwen3-Next-Thinking's: the generation prompt opens the block.
OPENING_TEMPLATE = CHATML_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}"
)
THOUGHT = "<think>\nThe user greets me.\n</think>\n\nHello there!"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100, **fields}


def streamed(payloads: list[Any]) -> tuple[str, str, list[dict[str, Any]]]:
    deltas = [chunk["choices"][0]["delta"] for chunk in payloads[:-1] if chunk["choices"]]
    reasoning = "".join(delta.get("reasoning_content", "") for delta in deltas)
    content = "".join(delta.get("content") or "" for delta in deltas)
    return reasoning, content, deltas


async def test_qwen3_thinking_is_split_streamed_and_not() -> None:
    async with serve(scripted(THOUGHT), chat_template=QWEN3_TEMPLATE) as served:
        body = (await served.client.post("/v1/chat/completions", json=chat())).json()
        message = body["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "Hello there!", "reasoning_content": "The user greets me."}
        response = await served.client.post("/v1/chat/completions", json=chat(stream=True))
        reasoning, content, deltas = streamed(sse_payloads(response.text))
    assert (reasoning, content) == ("The user greets me.", "Hello there!")
    assert deltas[0]["role"] == "assistant" and "reasoning_content" in deltas[0]
    assert not any("<" in delta.get("content", "") + delta.get("reasoning_content", "") for delta in deltas)


async def test_reasoning_format_none_leaves_thinking_in_content() -> None:
    async with serve(scripted(THOUGHT), chat_template=QWEN3_TEMPLATE) as served:
        body = (await served.client.post("/v1/chat/completions", json=chat(reasoning_format="none"))).json()
        assert body["choices"][0]["message"] == {"role": "assistant", "content": THOUGHT}
    async with serve(scripted(THOUGHT), chat_template=QWEN3_TEMPLATE, reasoning_format="none") as served:
        body = (await served.client.post("/v1/chat/completions", json=chat())).json()
        assert body["choices"][0]["message"]["content"] == THOUGHT
        body = (await served.client.post("/v1/chat/completions", json=chat(reasoning_format="deepseek"))).json()
        assert body["choices"][0]["message"]["reasoning_content"] == "The user greets me."


async def test_auto_splits_only_for_templates_that_know_think_blocks() -> None:
    async with serve(scripted(THOUGHT)) as served:  # ChatML: auto reads as none
        body = (await served.client.post("/v1/chat/completions", json=chat())).json()
        assert body["choices"][0]["message"]["content"] == THOUGHT
        body = (await served.client.post("/v1/chat/completions", json=chat(reasoning_format="deepseek"))).json()
        assert body["choices"][0]["message"]["content"] == "Hello there!"


async def test_a_template_that_opens_the_block_starts_the_answer_in_reasoning() -> None:
    config = FakeBackendConfig(script="Thinking...\n</think>\n\nDone.", chat_template=OPENING_TEMPLATE)
    async with serve(config) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(stream=True))
        reasoning, content, _ = streamed(sse_payloads(response.text))
        assert (reasoning, content) == ("Thinking...", "Done.")
        assert prompt_of(served.backend).endswith("<|im_start|>assistant\n<think>\n")


async def test_chat_template_kwargs_reach_the_template() -> None:
    async with serve(scripted("Hello!"), chat_template=QWEN3_TEMPLATE) as served:
        body = chat(chat_template_kwargs={"enable_thinking": False})
        message = (await served.client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "Hello!"}
        assert prompt_of(served.backend).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    async with serve(scripted("Hello!"), chat_template=QWEN3_TEMPLATE) as served:
        await served.client.post("/v1/chat/completions", json=chat())
        assert prompt_of(served.backend).endswith("<|im_start|>assistant\n")


async def test_past_reasoning_is_dropped_from_history_by_the_qwen3_template() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "Bye"},
    ]
    async with serve(scripted("Bye!"), chat_template=QWEN3_TEMPLATE) as served:
        response = await served.client.post("/v1/chat/completions", json=chat(messages=messages))
        assert response.status_code == 200, response.text
        prompt = prompt_of(served.backend)
    assert "<|im_start|>assistant\nHello!<|im_end|>" in prompt and "greets" not in prompt
