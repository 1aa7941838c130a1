"""Prompt logprobs on /v1/completions (echo + logprobs, max_tokens 0 or more) against the fake engine: the
legacy shape, values checked against the fake model computed directly, streaming, several prompts and n,
the 400s. At the end, the engine on real llama.cpp (tiny qwen3next and llama models): prompt logprobs equal
what greedy generation reports. The live server on SmolLM2 is checked by tests/integration/test_lm_eval.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.protocol import SamplingParams
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.engine.request import FinishReason, Request, TokenEvent

from .helpers import MODEL, Served, assert_openai_error, serve, sse_payloads

pytestmark = pytest.mark.anyio

PROMPT = "the cat sat on the mat"


def reference(backend: FakeBackend, tokens: list[int]) -> list[np.ndarray]:
    """The fake model's log-softmax after each prefix tokens[:i], i = 1..len-1, computed directly."""
    rows = []
    for i in range(1, len(tokens)):
        logits = backend._model(tokens[:i]).astype(np.float64)
        shifted = logits - logits.max()
        rows.append(shifted - np.log(np.exp(shifted).sum()))
    return rows


async def complete(served: Served, **body: Any) -> dict[str, Any]:
    response = await served.client.post("/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def check_prompt_logprobs(backend: FakeBackend, prompt: str, logprobs: dict[str, Any], n_top: int) -> None:
    tokens = list(prompt.encode())
    n = len(tokens)
    assert logprobs["tokens"][:n] == list(prompt)
    assert logprobs["text_offset"][:n] == list(range(n))  # one character per fake token
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i, row in enumerate(reference(backend, tokens), start=1):
        assert logprobs["token_logprobs"][i] == pytest.approx(row[tokens[i]], abs=1e-5)
        top = logprobs["top_logprobs"][i]
        assert len(top) == n_top
        values = list(top.values())
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        best = np.argsort(-row)[:n_top]
        assert values == pytest.approx(row[best], abs=1e-5)
        if tokens[i] in best:  # the prompt's own token, when it ranks, is in the list with its logprob
            assert top[chr(tokens[i])] == logprobs["token_logprobs"][i]


async def test_echo_logprobs_max_tokens_zero_returns_the_prompt_and_its_logprobs() -> None:
    async with serve() as served:
        body = await complete(served, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0, temperature=0)
        (choice,) = body["choices"]
        assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
        logprobs = choice["logprobs"]
        assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(logprobs["tokens"]) == len(PROMPT)
        check_prompt_logprobs(served.backend, PROMPT, logprobs, 3)
        assert body["usage"]["prompt_tokens"] == len(PROMPT) and body["usage"]["completion_tokens"] == 0


async def test_generated_tokens_follow_the_prompt_s_and_agree_with_greedy_generation() -> None:
    async with serve() as served:
        generated = await complete(served, prompt=PROMPT, logprobs=0, max_tokens=6, temperature=0)
        text = generated["choices"][0]["text"]
        gen_logprobs = generated["choices"][0]["logprobs"]["token_logprobs"]
        both = await complete(served, prompt=PROMPT, echo=True, logprobs=2, max_tokens=6, temperature=0)
        (choice,) = both["choices"]
        assert choice["text"] == PROMPT + text
        logprobs = choice["logprobs"]
        check_prompt_logprobs(served.backend, PROMPT, logprobs, 2)
        assert logprobs["tokens"] == list(PROMPT + text)
        assert logprobs["token_logprobs"][len(PROMPT) :] == pytest.approx(gen_logprobs)
        assert logprobs["text_offset"] == list(range(len(PROMPT + text)))
        # scoring the generated text as a prompt gives what the generation path reported for each token
        scored = await complete(served, prompt=PROMPT + text, echo=True, logprobs=1, max_tokens=0)
        assert scored["choices"][0]["logprobs"]["token_logprobs"][len(PROMPT) :] == pytest.approx(gen_logprobs)


async def test_streamed_first_chunk_carries_the_echoed_prompt_and_its_logprobs() -> None:
    async with serve() as served:
        request = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0}
        whole = (await complete(served, **request))["choices"][0]
        response = await served.client.post("/v1/completions", json={**request, "stream": True})
        assert response.status_code == 200
        chunks = [c for c in sse_payloads(response.text) if c != "[DONE]"]
        first = chunks[0]["choices"][0]
        assert first["text"].startswith(PROMPT)
        assert first["logprobs"]["token_logprobs"][0] is None
        assert len(first["logprobs"]["tokens"]) >= len(PROMPT)
        merged: dict[str, list[Any]] = {key: [] for key in whole["logprobs"]}
        for chunk in chunks:
            for key, values in (chunk["choices"][0]["logprobs"] or {}).items():
                merged[key] += values
        assert merged == whole["logprobs"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_streamed_max_tokens_zero_is_one_chunk_then_the_finish() -> None:
    async with serve() as served:
        request = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0, "stream": True}
        response = await served.client.post("/v1/completions", json=request)
        chunks = [c for c in sse_payloads(response.text) if c != "[DONE]"]
        assert len(chunks) == 2
        assert chunks[0]["choices"][0]["text"] == PROMPT
        check_prompt_logprobs(served.backend, PROMPT, chunks[0]["choices"][0]["logprobs"], 1)
        assert chunks[1]["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}


async def test_several_prompts_and_n_choices() -> None:
    prompts = ["first prompt", "and the second one"]
    async with serve() as served:
        body = await complete(served, prompt=prompts, n=2, echo=True, logprobs=1, max_tokens=2, temperature=0.8)
        choices = body["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2, 3]
        for choice in choices:
            prompt = prompts[choice["index"] // 2]
            assert choice["text"].startswith(prompt)
            check_prompt_logprobs(served.backend, prompt, choice["logprobs"], 1)
            assert len(choice["logprobs"]["tokens"]) == len(prompt) + 2


async def test_token_id_prompt() -> None:
    async with serve() as served:
        ids = list(b"token ids")
        body = await complete(served, prompt=ids, echo=True, logprobs=0, max_tokens=0)
        choice = body["choices"][0]
        assert choice["text"] == "token ids"
        check_prompt_logprobs(served.backend, "token ids", choice["logprobs"], 0)


async def test_prompt_longer_than_a_step_and_a_repeated_prompt_give_the_same_logprobs() -> None:
    prompt = "a prompt longer than one step's token budget, chunked across steps"
    config = FakeBackendConfig(n_batch=16)
    async with serve(config, EngineConfig(max_batch_tokens=16, prompt_cache_bytes=1 << 24)) as served:
        first = await complete(served, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
        check_prompt_logprobs(served.backend, prompt, first["choices"][0]["logprobs"], 2)
        # the slot now holds this prompt; asking again must compute it again, not reuse it
        again = await complete(served, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
        assert again["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_recurrent_model() -> None:
    async with serve(FakeBackendConfig(supports_partial_removal=False, state_bytes_fixed=4096)) as served:
        await complete(served, prompt=PROMPT + " and more", max_tokens=2)
        body = await complete(served, prompt=PROMPT, echo=True, logprobs=2, max_tokens=3, temperature=0)
        check_prompt_logprobs(served.backend, PROMPT, body["choices"][0]["logprobs"], 2)


async def test_echo_without_logprobs_and_max_tokens_zero_returns_the_prompt() -> None:
    async with serve() as served:
        body = await complete(served, prompt=PROMPT, echo=True, max_tokens=0)
        assert body["choices"][0]["text"] == PROMPT and body["choices"][0]["logprobs"] is None


async def test_a_one_token_prompt_has_only_the_null_entry() -> None:
    async with serve() as served:
        body = await complete(served, prompt="x", echo=True, logprobs=3, max_tokens=0)
        assert body["choices"][0]["logprobs"] == {
            "tokens": ["x"],
            "token_logprobs": [None],
            "top_logprobs": [None],
            "text_offset": [0],
        }


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": PROMPT, "max_tokens": 0},
        {"prompt": PROMPT, "max_tokens": 0, "logprobs": 2},
        {"prompt": PROMPT, "max_tokens": 0, "stream": True},
    ],
)
async def test_max_tokens_zero_without_echo_is_400(body: dict[str, Any]) -> None:
    async with serve() as served:
        assert_openai_error(await served.client.post("/v1/completions", json=body), 400, param="max_tokens")


async def test_logprobs_above_twenty_is_400_with_echo_too() -> None:
    async with serve() as served:
        response = await served.client.post(
            "/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 21, "max_tokens": 0}
        )
        assert_openai_error(response, 400, param="logprobs")


# --- the engine on real llama.cpp: tiny random models of the real architectures ----------------------------


def llama_engine(model: Path, prompt_cache_bytes: int = 0) -> Engine:
    backend = LlamaBackend(
        model,
        LlamaBackendConfig(
            n_slots=1,  # so scoring must empty the slot that generated (stashing it), recurrent state included
            n_ctx_per_slot=256,
            n_batch=32,
            n_ubatch=32,
            n_threads=2,
            use_extra_bufts=False,
            type_k="f32",
            type_v="f32",
            flash_attn="off",
        ),
    )
    return Engine(
        backend, EngineConfig(max_batch_tokens=32, snapshot_min_tokens=8, prompt_cache_bytes=prompt_cache_bytes)
    )


async def engine_events(engine: Engine, request: Request) -> list[TokenEvent]:
    return [event async for event in engine.submit(request)]


@pytest.mark.parametrize("arch", ["qwen3next", "llama"])
async def test_prompt_logprobs_equal_the_greedy_generation_path_on_llama_cpp(
    arch: str, request: pytest.FixtureRequest
) -> None:
    """Generate greedily one token at a time (each logprob from a one-token decode), then score prompt +
    generated tokens as one prompt (chunked prefill with logits at every position): the logprobs agree."""
    engine = llama_engine(Path(request.getfixturevalue(f"tiny_{arch}_gguf")), prompt_cache_bytes=1 << 26)
    engine.start()
    try:
        prompt = tuple(engine.vocab.tokenize("Hello there, how are you today?", add_special=True, parse_special=False))
        greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=True, top_logprobs=5)
        generated = await engine_events(engine, Request(prompt, greedy))
        tokens = [t for e in generated for t in e.token_ids]
        gen_logprobs = [lp for e in generated for lp in e.logprobs]
        assert len(tokens) == 40
        # the slot now holds prompt + output: scoring them must not reuse that (it has no logits)
        scored = await engine_events(
            engine, Request(prompt + tuple(tokens), SamplingParams(max_tokens=0), prompt_logprobs=5)
        )
        (event,) = scored
        assert event.finish_reason is FinishReason.LENGTH and event.n_cached_tokens == 0
        prompt_lps = event.prompt_logprobs
        assert [lp.token for lp in prompt_lps] == [*prompt[1:], *tokens]  # 40 + len(prompt) - 1 > one 32-token chunk
        for got, want in zip(prompt_lps[len(prompt) - 1 :], gen_logprobs, strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert got.top[0].token == want.token  # greedy: the generated token is the best
            assert [t.logprob for t in got.top] == pytest.approx([t.logprob for t in want.top], abs=1e-4)
        for entry in prompt_lps:
            assert entry.logprob <= 0 and all(t.logprob <= 0 for t in entry.top)
            assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
            ranked = {t.token: t.logprob for t in entry.top}
            if entry.token in ranked:
                assert ranked[entry.token] == entry.logprob
    finally:
        engine.stop()
