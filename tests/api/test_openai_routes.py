"""The OpenAI routes against the fake engine: shapes, streaming order, usage, n, logprobs, stop, extras."""

from __future__ import annotations

from typing import Any

import pytest

from bindings.protocol import SamplingParams
from server.api.generation import sampling_params
from server.api.schemas import ChatCompletionRequest
from server.engine.fake_backend import EOS, FakeBackend, FakeBackendConfig

from .helpers import MODEL, Served, serve, sse_payloads

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]
CHATML_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


async def chat(served: Served, **body: Any) -> dict[str, Any]:
    response = await served.client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, **body})
    assert response.status_code == 200, response.text
    return response.json()


async def chat_stream(served: Served, **body: Any) -> list[Any]:
    response = await served.client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": HI, "stream": True, **body}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_payloads(response.text)


def prompt_length(served: Served, text: str) -> int:
    return len(served.backend.tokenize(text, add_special=True, parse_special=True))


async def test_models_lists_the_served_model() -> None:
    async with serve() as served:
        body = (await served.client.get("/v1/models")).json()
        assert body["object"] == "list"
        [card] = body["data"]
        assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "qwen3-local"
        assert isinstance(card["created"], int)
        assert (await served.client.get(f"/v1/models/{MODEL}")).json() == card


async def test_chat_completion_object_and_exact_usage() -> None:
    async with serve() as served:
        body = await chat(served, max_tokens=7, temperature=0)
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
        [choice] = body["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
        assert choice["message"]["role"] == "assistant" and len(choice["message"]["content"]) == 7
        n_prompt = prompt_length(served, CHATML_HI)
        assert body["usage"] == {
            "prompt_tokens": n_prompt,
            "completion_tokens": 7,
            "total_tokens": n_prompt + 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        again = await chat(served, max_tokens=7, temperature=0)
        assert again["choices"][0]["message"]["content"] == choice["message"]["content"]  # greedy: same text
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the slot kept the prompt


async def test_max_completion_tokens_takes_precedence() -> None:
    async with serve() as served:
        body = await chat(served, max_tokens=9, max_completion_tokens=3, temperature=0)
        assert body["usage"]["completion_tokens"] == 3


async def test_stream_chunks_come_in_openai_order() -> None:
    async with serve() as served:
        expected = (await chat(served, max_tokens=6, temperature=0))["choices"][0]["message"]["content"]
        payloads = await chat_stream(served, max_tokens=6, temperature=0)
        assert payloads[-1] == "[DONE]"
        chunks = payloads[:-1]
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert all("usage" not in c for c in chunks)  # include_usage was not asked for
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert deltas[0]["role"] == "assistant"
        assert all("role" not in d for d in deltas[1:])
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
        assert deltas[-1] == {}
        assert "".join(d.get("content", "") for d in deltas) == expected


async def test_stream_include_usage_adds_a_final_usage_chunk() -> None:
    async with serve() as served:
        payloads = await chat_stream(served, max_tokens=5, temperature=0, stream_options={"include_usage": True})
        *chunks, usage_chunk, done = payloads
        assert done == "[DONE]"
        assert all(c["usage"] is None for c in chunks)
        assert usage_chunk["choices"] == []
        n_prompt = prompt_length(served, CHATML_HI)
        assert usage_chunk["usage"] == {
            "prompt_tokens": n_prompt,
            "completion_tokens": 5,
            "total_tokens": n_prompt + 5,
            "prompt_tokens_details": {"cached_tokens": 0},
        }


async def test_n_choices_share_the_prompt_and_sum_their_tokens() -> None:
    async with serve() as served:
        body = await chat(served, n=3, max_tokens=4, temperature=1.0, seed=7)
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert all(len(c["message"]["content"]) == 4 for c in body["choices"])
        assert body["usage"]["prompt_tokens"] == prompt_length(served, CHATML_HI)  # counted once
        assert body["usage"]["completion_tokens"] == 12

        payloads = await chat_stream(served, n=3, max_tokens=4, temperature=1.0, seed=7)
        chunks = payloads[:-1]
        for index in range(3):
            own = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
            assert own[0]["delta"]["role"] == "assistant" and own[-1]["finish_reason"] == "length"
            text = "".join(c["delta"].get("content", "") for c in own)
            assert text == body["choices"][index]["message"]["content"]  # same seed: same choices


async def test_seed_makes_sampling_reproducible() -> None:
    async with serve() as served:
        first = await chat(served, max_tokens=12, temperature=1.5, seed=1234)
        second = await chat(served, max_tokens=12, temperature=1.5, seed=1234)
        assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


async def test_chat_logprobs_shapes() -> None:
    async with serve() as served:
        body = await chat(served, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
        choice = body["choices"][0]
        entries = choice["logprobs"]["content"]
        assert len(entries) == 5
        assert "".join(e["token"] for e in entries) == choice["message"]["content"]
        for entry in entries:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            assert bytes(entry["bytes"]).decode() == entry["token"] and entry["logprob"] <= 0
            assert len(entry["top_logprobs"]) == 3
            assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy picks the best
            assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}

        payloads = await chat_stream(served, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
        streamed = [
            e for c in payloads[:-1] if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]
        ]
        assert [e["token"] for e in streamed] == [e["token"] for e in entries]
        assert all(len(e["top_logprobs"]) == 2 for e in streamed)


async def test_stop_string_ends_the_answer_before_it() -> None:
    async with serve() as served:
        full = (await chat(served, max_tokens=20, temperature=0))["choices"][0]["message"]["content"]
        stop = full[5:8]
        cut = full.find(stop)
        body = await chat(served, max_tokens=20, temperature=0, stop=[stop, "never-seen"])
        assert body["choices"][0]["message"]["content"] == full[:cut]
        assert body["choices"][0]["finish_reason"] == "stop"
        payloads = await chat_stream(served, max_tokens=20, temperature=0, stop=stop)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in payloads[:-1])
        assert text == full[:cut] and payloads[-2]["choices"][0]["finish_reason"] == "stop"


async def test_logit_bias_forces_a_token() -> None:
    async with serve() as served:
        body = await chat(served, max_tokens=6, temperature=0, logit_bias={str(ord("A")): 100})
        assert body["choices"][0]["message"]["content"] == "AAAAAA"


async def test_content_parts_are_joined_and_developer_is_system() -> None:
    template = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    async with serve(FakeBackendConfig(chat_template=template)) as served:
        messages = [
            {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
        response = await served.client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == len("[system:rules][user:a\nb]")


async def test_completion_with_a_string_prompt() -> None:
    async with serve() as served:
        response = await served.client.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 5})
        body = response.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        [choice] = body["choices"]
        assert len(choice["text"]) == 5 and choice["finish_reason"] == "length" and choice["logprobs"] is None
        assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 5


async def test_completion_default_max_tokens_is_openais_16() -> None:
    async with serve() as served:
        body = (await served.client.post("/v1/completions", json={"prompt": "x", "temperature": 0})).json()
        assert body["usage"]["completion_tokens"] == 16


async def test_completion_token_prompt_equals_the_text_prompt() -> None:
    async with serve() as served:
        as_text = await served.client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 6, "temperature": 0})
        as_ids = await served.client.post(
            "/v1/completions", json={"prompt": [97, 98, 99], "max_tokens": 6, "temperature": 0}
        )
        assert as_ids.json()["choices"][0]["text"] == as_text.json()["choices"][0]["text"]
        assert as_ids.json()["usage"]["prompt_tokens"] == 3


async def test_several_prompts_give_n_choices_each_in_order() -> None:
    async with serve() as served:
        singles = []
        for prompt in ("ab", "xyz"):
            response = await served.client.post(
                "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}
            )
            singles.append(response.json()["choices"][0]["text"])
        response = await served.client.post(
            "/v1/completions", json={"prompt": ["ab", "xyz"], "n": 2, "max_tokens": 4, "temperature": 0}
        )
        body = response.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in body["choices"]] == [singles[0], singles[0], singles[1], singles[1]]
        assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 16

        response = await served.client.post(
            "/v1/completions",
            json={
                "prompt": [[97, 98], [120, 121, 122]],
                "max_tokens": 4,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        payloads = sse_payloads(response.text)
        assert payloads[-1] == "[DONE]" and payloads[-2]["usage"]["completion_tokens"] == 8
        texts = {0: "", 1: ""}
        for chunk in payloads[:-2]:
            assert chunk["object"] == "text_completion"
            texts[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
        assert texts == {0: singles[0], 1: singles[1]}


async def test_completion_legacy_logprobs() -> None:
    async with serve() as served:
        response = await served.client.post(
            "/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0, "logprobs": 2}
        )
        choice = response.json()["choices"][0]
        logprobs = choice["logprobs"]
        assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 6
        assert logprobs["text_offset"] == list(range(6))  # one character per fake token
        for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
            assert len(top) == 2 and token in top


async def test_completion_echo_prepends_the_prompt() -> None:
    async with serve() as served:
        plain = await served.client.post("/v1/completions", json={"prompt": "hey", "max_tokens": 3, "temperature": 0})
        echoed = await served.client.post(
            "/v1/completions", json={"prompt": "hey", "max_tokens": 3, "temperature": 0, "echo": True}
        )
        assert echoed.json()["choices"][0]["text"] == "hey" + plain.json()["choices"][0]["text"]


async def test_long_prompt_is_tokenized_exactly() -> None:
    async with serve(FakeBackendConfig(n_ctx_per_slot=12000, n_batch=512)) as served:
        prompt = "word " * 2000  # past the size that is tokenized off the event loop
        response = await served.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == len(prompt)


async def test_ignore_eos_keeps_generating_past_the_end_token() -> None:
    force_eos = {str(EOS): 100}
    async with serve() as served:
        ended = await chat(served, max_tokens=5, temperature=0, logit_bias=force_eos)
        assert ended["choices"][0]["finish_reason"] == "stop" and ended["choices"][0]["message"]["content"] == ""
        ignored = await chat(served, max_tokens=5, temperature=0, logit_bias=force_eos, ignore_eos=True)
        assert ignored["choices"][0]["finish_reason"] == "length"
        assert ignored["usage"]["completion_tokens"] == 5


def test_request_fields_map_onto_sampling_params() -> None:
    info = FakeBackend().info
    body = ChatCompletionRequest.model_validate(
        {
            "messages": HI,
            "max_completion_tokens": 33,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 7,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "seed": 42,
            "stop": ["\n\n", ""],
            "logit_bias": {"65": -100, "66": 2.5},
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 4,
        }
    )
    params = sampling_params(body, info, max_tokens=body.output_limit, logprobs=True, top_logprobs=4, default_top_k=40)
    assert params == SamplingParams(
        max_tokens=33,
        temperature=0.7,
        top_k=7,
        top_p=0.9,
        min_p=0.05,
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repeat_penalty=1.1,
        logit_bias=params.logit_bias,
        stop=("\n\n",),  # the empty stop string is dropped: it would end every answer at once
        ignore_eos=True,
        logprobs=True,
        top_logprobs=4,
    )
    assert dict(params.logit_bias) == {65: -100.0, 66: 2.5}
    defaults = sampling_params(
        ChatCompletionRequest.model_validate({"messages": HI}),
        info,
        max_tokens=None,
        logprobs=False,
        top_logprobs=0,
        default_top_k=40,
    )
    # OpenAI's defaults (temperature 1, top_p 1, no penalties) plus the server's top_k, as llama-server does
    assert defaults == SamplingParams(top_k=40)
