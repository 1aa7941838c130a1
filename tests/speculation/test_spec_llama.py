"""Speculative decoding on real llama.cpp: greedy output is token-for-token the output without it (SmolLM2 with
n-gram and draft-model drafting; tiny qwen3next and qwen3moe in mixed batches, with stop strings and max_tokens
inside accepted runs), and sampled output keeps its distribution (chi-square over many seeds)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bindings.draft_model import DraftModelConfig, LlamaDraftModel
from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.protocol import BackendError, BatchEntry, Drafter, DraftRequest, SamplingParams
from convert.synth import write_synthetic_model
from registry.models import resolve_model
from server.engine.engine import Engine, EngineConfig
from server.engine.request import FinishReason, Request, TokenEvent
from server.engine.speculation import NgramDrafter, SpeculationConfig
from server.engine.text_stream import TextStream
from tests.speculation.stats import chi2_quantile, homogeneity

pytestmark = pytest.mark.slow

T = TypeVar("T")
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
SPEC = SpeculationConfig(draft_max=6, draft_min=1, max_step_tokens=64)
PASSAGE = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt wind. Every night "
    "the keeper climbed the spiral stairs, trimmed the wick, and watched the beam sweep across the dark water."
)
REPETITIVE = f"Copy the text.\nText: {PASSAGE}\nCopy: {PASSAGE}\nText: {PASSAGE}\nCopy: The old lighthouse"


def make_engine(
    model: Path, *, drafter: Drafter | None = None, n_slots: int = 4, spec: SpeculationConfig = SPEC
) -> Engine:
    backend = LlamaBackend(
        model,
        LlamaBackendConfig(
            n_slots=n_slots,
            n_ctx_per_slot=512,
            n_batch=128,
            n_ubatch=128,
            n_threads=1,  # two spinning ggml threads on a busy 2-core machine wait on each other for whole slices
            use_extra_bufts=False,
            type_k="f32",
            type_v="f32",
            flash_attn="off",
        ),
    )
    config = EngineConfig(max_batch_tokens=128, max_queue=1000, snapshot_min_tokens=8, speculation=spec)
    return Engine(backend, config, drafter=drafter)


def run(engine: Engine, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        engine.start()
        try:
            return await body()
        finally:
            engine.stop()

    return asyncio.run(main())


async def generate(engine: Engine, request: Request) -> list[TokenEvent]:
    return [event async for event in engine.submit(request)]


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def tokenize(engine: Engine, text: str) -> tuple[int, ...]:
    return tuple(engine.vocab.tokenize(text, add_special=True, parse_special=False))


def generate_all(engine: Engine, requests: Callable[[Engine], list[Request]], stagger: bool = True) -> list[Any]:
    """Submit every request (the later ones while the first decode: mixed batches), return each one's events
    and the engine's stats."""

    async def body() -> tuple[list[list[TokenEvent]], Any]:
        tasks = []
        for index, request in enumerate(requests(engine)):
            tasks.append(asyncio.ensure_future(generate(engine, request)))
            if stagger and index == 0:
                await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks)
        return list(results), engine.stats()

    return list(run(engine, body))


class ReferenceDrafter:
    """Drafts the reference (non-speculative) output of each prompt, wrong on purpose every `wrong_every`-th
    draft at its second position: exercises accepted runs and rejections (rollbacks) deterministically."""

    name = "reference"

    def __init__(self, reference: dict[tuple[int, ...], list[int]], wrong_every: int = 0, n_vocab: int = 1) -> None:
        self.reference = reference
        self.wrong_every = wrong_every
        self.n_vocab = n_vocab
        self.n_calls = 0

    def draft(self, requests: Sequence[DraftRequest]) -> list[tuple[int, ...]]:
        drafts = []
        for request in requests:
            self.n_calls += 1
            expected = self.reference.get(tuple(request.prompt), [])
            draft = list(expected[len(request.output) : len(request.output) + request.n_max])
            if self.wrong_every and self.n_calls % self.wrong_every == 0 and len(draft) > 1:
                draft[1] = (draft[1] + 1) % self.n_vocab
            drafts.append(tuple(draft))
        return drafts

    def forget(self, key: int) -> None:
        pass

    def observe(self, entries: Sequence[BatchEntry]) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return resolve_model("smollm2-135m-instruct").path


def smollm2_requests(engine: Engine) -> list[Request]:
    chat = "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"
    return [
        Request(tokenize(engine, REPETITIVE), GREEDY),
        Request(tokenize(engine, chat), GREEDY),
        Request(tokenize(engine, REPETITIVE), replace(GREEDY, speculative=False)),
    ]


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_smollm2_greedy_output_is_identical_with_speculation(kind: str, smollm2_path: Path) -> None:
    plain, plain_stats = generate_all(make_engine(smollm2_path), smollm2_requests)
    assert plain_stats.n_draft_tokens == 0
    engine = make_engine(smollm2_path)
    drafter: Drafter = (
        NgramDrafter()
        if kind == "ngram"
        else LlamaDraftModel(
            smollm2_path,
            DraftModelConfig(n_slots=4, n_ctx_per_slot=engine.info.n_ctx_per_slot, n_batch=128, n_threads=1),
            target_n_vocab=engine.info.n_vocab,
        )
    )
    engine = make_engine(smollm2_path, drafter=drafter)
    spec, stats = generate_all(engine, smollm2_requests)
    assert [tokens_of(events) for events in spec] == [tokens_of(events) for events in plain]
    assert [text_of(events) for events in spec] == [text_of(events) for events in plain]
    assert stats.spec_type == kind and stats.n_draft_accepted > 0, stats
    if kind == "draft":
        assert stats.n_draft_accepted / stats.n_draft_tokens > 0.9, "the model drafting for itself is right"
    assert any(len(e.token_ids) > 1 for e in spec[0]), "several tokens came out of one step"


@pytest.fixture(params=["qwen3next", "qwen3moe"])
def tiny_model(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(f"tiny_{request.param}_gguf"))


TINY_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away,",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9",
    "A long prompt that arrives late and is prefilled in chunks beside the decoding slots. " * 3,
)


def tiny_requests(params: Sequence[SamplingParams]) -> Callable[[Engine], list[Request]]:
    def make(engine: Engine) -> list[Request]:
        return [
            Request(tokenize(engine, prompt), replace(p, speculative=i != 1))  # the second one opts out
            for i, (prompt, p) in enumerate(zip(TINY_PROMPTS, params, strict=True))
        ]

    return make


@pytest.mark.parametrize("wrong_every", [0, 2])
def test_tiny_models_mixed_batches_are_identical_with_speculation(tiny_model: Path, wrong_every: int) -> None:
    params = [GREEDY] * 4
    plain, _ = generate_all(make_engine(tiny_model), tiny_requests(params))
    probe = make_engine(tiny_model)
    reference = {tokenize(probe, p): tokens_of(events) for p, events in zip(TINY_PROMPTS, plain, strict=True)}
    probe.stop()
    drafter = ReferenceDrafter(reference, wrong_every=wrong_every, n_vocab=probe.info.n_vocab)
    spec, stats = generate_all(make_engine(tiny_model, drafter=drafter), tiny_requests(params))
    assert [tokens_of(events) for events in spec] == [tokens_of(events) for events in plain]
    assert stats.n_draft_accepted > 0
    if wrong_every:
        assert stats.n_draft_accepted < stats.n_draft_tokens, "some drafts were rejected (rolled back)"


def test_tiny_models_stop_strings_and_max_tokens_inside_accepted_runs(tiny_model: Path) -> None:
    plain, _ = generate_all(make_engine(tiny_model), tiny_requests([GREEDY] * 4))
    probe = make_engine(tiny_model)
    reference = {tokenize(probe, p): tokens_of(events) for p, events in zip(TINY_PROMPTS, plain, strict=True)}
    stop = _stop_inside_a_run(probe, tokens_of(plain[0]), text_of(plain[0]))
    probe.stop()
    params = [replace(GREEDY, stop=(stop,)), GREEDY, replace(GREEDY, max_tokens=5), replace(GREEDY, max_tokens=11)]
    plain_bounded, _ = generate_all(make_engine(tiny_model), tiny_requests(params))
    drafter = ReferenceDrafter(reference)
    spec, stats = generate_all(make_engine(tiny_model, drafter=drafter), tiny_requests(params))
    assert [tokens_of(events) for events in spec] == [tokens_of(events) for events in plain_bounded]
    assert [text_of(events) for events in spec] == [text_of(events) for events in plain_bounded]
    assert spec[0][-1].finish_reason is FinishReason.STOP and stop not in text_of(spec[0])
    assert len(tokens_of(spec[2])) == 5 and len(tokens_of(spec[3])) == 11
    assert any(len(e.token_ids) > 2 and e.finish_reason for e in spec[0]), "the stop came inside a drafted run"
    assert stats.n_draft_accepted > 0


def _stop_inside_a_run(engine: Engine, tokens: list[int], text: str) -> str:
    """A two-character stop string of the output that plain decoding detects at output token 3..5: inside the
    first drafted run (drafts start after token 0 and are 6 long)."""
    for start in range(len(text) - 1):
        stop = text[start : start + 2]
        if "\ufffd" in stop or not stop.strip() or text.find(stop) != start:
            continue
        stream = TextStream((stop,))
        stopped_at = next(
            (i for i, token in enumerate(tokens) if (stream.push(engine.vocab.piece(token)), stream.stopped)[1]), None
        )
        if stopped_at is not None and 3 <= stopped_at <= 5:
            return stop
    pytest.fail(f"no usable stop string in {text!r}")


def test_ngram_on_a_tiny_hybrid_model_is_identical(tiny_qwen3next_gguf: Path) -> None:
    prompt_text = "one two three four one two three four one two three four one two"
    params = replace(GREEDY, max_tokens=32)

    def requests(engine: Engine) -> list[Request]:
        return [Request(tokenize(engine, prompt_text), params), Request(tokenize(engine, TINY_PROMPTS[0]), params)]

    plain, _ = generate_all(make_engine(tiny_qwen3next_gguf), requests)
    # n_min 1: the random model's output rarely repeats two tokens, and the point here is the drafts' rollback
    spec, stats = generate_all(make_engine(tiny_qwen3next_gguf, drafter=NgramDrafter(n_max=4, n_min=1)), requests)
    assert [tokens_of(events) for events in spec] == [tokens_of(events) for events in plain]
    assert stats.n_draft_tokens > 0


def test_a_hybrid_draft_model_is_refused(tiny_qwen3next_gguf: Path, tiny_qwen3moe_gguf: Path) -> None:
    config = DraftModelConfig(n_slots=1, n_ctx_per_slot=256, n_threads=1)
    with pytest.raises(BackendError, match="recurrent/hybrid"):
        LlamaDraftModel(tiny_qwen3next_gguf, config, target_n_vocab=425)
    with pytest.raises(BackendError, match="vocabulary"):
        LlamaDraftModel(tiny_qwen3moe_gguf, config, target_n_vocab=49152)


@pytest.fixture(scope="module")
def tiny_qwen3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_model("qwen3", tmp_path_factory.mktemp("spec") / "tiny-qwen3.gguf")


def test_sampling_keeps_its_distribution_with_speculation(tiny_qwen3_gguf: Path) -> None:
    """Output tokens 2 and 3 (the first ones a draft can cover) over many seeds, with and without drafts of
    the greedy reference: chi-square homogeneity, and with the same seed the very same tokens."""
    n_seeds = 240
    prompt = "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9"
    sampling = SamplingParams(temperature=0.8, max_tokens=4, ignore_eos=True)
    greedy, _ = generate_all(
        make_engine(tiny_qwen3_gguf), lambda e: [Request(tokenize(e, prompt), replace(sampling, temperature=0.0))]
    )

    def requests(first_seed: int) -> Callable[[Engine], list[Request]]:
        return lambda e: [Request(tokenize(e, prompt), replace(sampling, seed=first_seed + i)) for i in range(n_seeds)]

    probe = make_engine(tiny_qwen3_gguf)
    reference = {tokenize(probe, prompt): tokens_of(greedy[0])}
    probe.stop()
    plain, _ = generate_all(make_engine(tiny_qwen3_gguf), requests(0), stagger=False)
    plain_other, _ = generate_all(make_engine(tiny_qwen3_gguf), requests(n_seeds), stagger=False)
    spec_engine = make_engine(tiny_qwen3_gguf, drafter=ReferenceDrafter(reference))
    spec, stats = generate_all(spec_engine, requests(n_seeds), stagger=False)
    assert stats.n_draft_tokens > 0 and 0 < stats.n_draft_accepted < stats.n_draft_tokens
    assert [tokens_of(e) for e in spec] == [tokens_of(e) for e in plain_other], "same seed, same tokens"
    for position in (1, 2):
        with_spec = [tokens_of(e)[position] for e in spec]
        without = [tokens_of(e)[position] for e in plain]
        statistic, dof = homogeneity(with_spec, without)
        assert len(set(without)) > 2, "the test needs a spread-out distribution"
        assert statistic < chi2_quantile(dof), (position, statistic, dof)
