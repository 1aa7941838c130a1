"""The engine on real llama.cpp with tiny random-weight models of the real architectures, 4 slots.

qwen3next is the case that matters most: a hybrid of Gated DeltaNet (recurrent state, which llama.cpp cannot
cut back to a prefix) and gated attention, with routed + shared experts. Batched results must equal
single-sequence results, and prefix reuse (state snapshot + restore) must give exactly a cold run's tokens.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.protocol import SamplingParams
from server.engine.engine import Engine, EngineConfig, EngineStats
from server.engine.request import FinishReason, Request, TokenEvent

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away,",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9",
    "Qwen3-Next mixes linear attention with full attention.",
    "short",
]


def make_engine(model: Path, *, n_slots: int = 4, prefix_reuse: bool = True, prompt_cache_bytes: int = 0) -> Engine:
    backend = LlamaBackend(
        model,
        LlamaBackendConfig(
            n_slots=n_slots,
            n_ctx_per_slot=256,
            n_batch=64,
            n_ubatch=64,
            n_threads=2,
            use_extra_bufts=False,
            type_k="f32",
            type_v="f32",
            flash_attn="off",
        ),
    )
    return Engine(
        backend,
        EngineConfig(
            max_batch_tokens=64,
            prefix_reuse=prefix_reuse,
            snapshot_min_tokens=8,
            prompt_cache_bytes=prompt_cache_bytes,
        ),
    )


async def generate(engine: Engine, prompt: str | tuple[int, ...], params: SamplingParams = GREEDY) -> list[TokenEvent]:
    tokens = (
        tuple(engine.vocab.tokenize(prompt, add_special=True, parse_special=False))
        if isinstance(prompt, str)
        else prompt
    )
    return [event async for event in engine.submit(Request(tokens, params))]


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def run(engine: Engine, body):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        engine.start()
        try:
            return await body()
        finally:
            engine.stop()

    return asyncio.run(main())


@pytest.fixture(params=["qwen3next", "qwen3moe", "llama"])
def tiny_model(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(f"tiny_{request.param}_gguf"))


def test_batched_results_equal_single_sequence_results(tiny_model: Path) -> None:
    solo_engine = make_engine(tiny_model, n_slots=1)
    solo = run(solo_engine, lambda: _sequentially(solo_engine))
    engine = make_engine(tiny_model)

    async def together() -> list[list[int]]:
        results = await asyncio.gather(*(generate(engine, p) for p in PROMPTS))
        return [tokens_of(events) for events in results]

    batched = run(engine, together)
    assert batched == solo
    assert all(len(tokens) == 16 for tokens in batched)
    assert len({tuple(t) for t in batched}) > 1, "different prompts should not all give the same output"


async def _sequentially(engine: Engine) -> list[list[int]]:
    return [tokens_of(await generate(engine, p)) for p in PROMPTS]


def test_qwen3next_prefix_reuse_restores_state_and_matches_a_cold_run(tiny_qwen3next_gguf: Path) -> None:
    engine = make_engine(tiny_qwen3next_gguf, n_slots=1)
    assert not engine.info.supports_partial_removal
    system = "You are a helpful assistant. Answer briefly and precisely. "
    first_prompt = system + "Question one?"
    second_prompt = system + "Question one? And a follow-up question."

    n_first_prompt_tokens = len(engine.vocab.tokenize(first_prompt, add_special=True, parse_special=False))

    async def warm() -> tuple[list[TokenEvent], list[TokenEvent], list[TokenEvent]]:
        first = await generate(engine, first_prompt)
        second = await generate(engine, second_prompt)  # restores the state saved after first_prompt
        # the slot now holds second's prompt + all of its output but the last token: continue from there
        history = tuple(engine.vocab.tokenize(second_prompt, add_special=True, parse_special=False))
        third = await generate(engine, history + tuple(tokens_of(second)[:-1]) + (5, 6, 7))
        return first, second, third

    first, second, third = run(engine, warm)
    assert first[-1].n_cached_tokens == 0
    assert second[-1].n_cached_tokens == n_first_prompt_tokens
    assert third[-1].n_cached_tokens == third[-1].n_prompt_tokens - 3

    cold_engine = make_engine(tiny_qwen3next_gguf, n_slots=1, prefix_reuse=False)

    async def cold() -> tuple[list[TokenEvent], list[TokenEvent]]:
        second_cold = await generate(cold_engine, second_prompt)
        history = tuple(cold_engine.vocab.tokenize(second_prompt, add_special=True, parse_special=False))
        third_cold = await generate(cold_engine, history + tuple(tokens_of(second)[:-1]) + (5, 6, 7))
        return second_cold, third_cold

    second_cold, third_cold = run(cold_engine, cold)
    assert second_cold[-1].n_cached_tokens == 0
    assert tokens_of(second) == tokens_of(second_cold)
    assert tokens_of(third) == tokens_of(third_cold)


def test_qwen3next_n_choices_fork_the_recurrent_state(tiny_qwen3next_gguf: Path) -> None:
    engine = make_engine(tiny_qwen3next_gguf)
    prompt = "Fork this prompt into three choices."
    params = replace(GREEDY, max_tokens=12)

    async def body() -> tuple[list[TokenEvent], list[TokenEvent]]:
        single = await generate(engine, prompt, params)
        tokens = tuple(engine.vocab.tokenize(prompt, add_special=True, parse_special=False))
        forked = [event async for event in engine.submit(Request(tokens, params, n=3))]
        return single, forked

    single, forked = run(engine, body)
    for choice in range(3):
        choice_tokens = [t for e in forked if e.choice_index == choice for t in e.token_ids]
        assert choice_tokens == tokens_of(single), f"greedy choice {choice} differs from the single run"
    assert {e.finish_reason for e in forked if e.finish_reason} == {FinishReason.LENGTH}


@pytest.mark.parametrize("arch", ["qwen3next", "qwen3moe"])
def test_prompt_cache_restores_a_conversation_after_its_slot_was_reused(
    arch: str, request: pytest.FixtureRequest
) -> None:
    model = Path(request.getfixturevalue(f"tiny_{arch}_gguf"))
    engine = make_engine(model, n_slots=1, prompt_cache_bytes=64 << 20)
    first_prompt = "A conversation that will come back later, after another one."
    n_first = len(engine.vocab.tokenize(first_prompt, add_special=True, parse_special=False))

    async def warm() -> tuple[tuple[int, ...], list[TokenEvent], EngineStats]:
        first = await generate(engine, first_prompt)
        await generate(engine, "Something unrelated takes the only slot.")
        history = tuple(engine.vocab.tokenize(first_prompt, add_special=True, parse_special=False))
        history += tuple(tokens_of(first)[:-1])
        return history, await generate(engine, (*history, 5, 6, 7)), engine.stats()

    history, returning, stats = run(engine, warm)
    assert returning[-1].n_cached_tokens == len(history) > n_first, "the whole conversation came back from RAM"
    assert stats.n_prompt_cache_hits == 1 and stats.prompt_cache_entries >= 1
    # entries are sized by llama.cpp (llama_state_seq_get_size): KV of their tokens, plus the recurrent state
    assert 0 < stats.prompt_cache_bytes <= stats.prompt_cache_budget_bytes == 64 << 20
    cold_engine = make_engine(model, n_slots=1, prefix_reuse=False)

    async def cold() -> list[TokenEvent]:
        return await generate(cold_engine, (*history, 5, 6, 7))

    assert tokens_of(returning) == tokens_of(run(cold_engine, cold))
