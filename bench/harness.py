"""Shared pieces of the benchmarks: the thread count, and engines and schedulers brought to a steady decode
state for the step benchmarks.

In the steady state every slot holds a request that has finished its prompt and decodes one token per step for
as long as the benchmark runs: no max_tokens, a context too large to fill, a token that is never
end-of-generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from bindings.protocol import SampledToken, SamplingParams, Vocab
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.engine.request import Request
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SequenceStatus

N_THREADS = 2  # the development machines' cores; llama.cpp's speed depends on it, so the benchmarks fix it
# Larger than any benchmark's step count: no slot ever reaches the end of its context.
UNBOUNDED_CTX = 1 << 30
PROMPT_TOKENS = 32
MAX_BATCH_TOKENS = 512
DECODED_TOKEN = ord("a")  # a printable byte in the fake vocabulary: one character of text per step
GREEDY_UNBOUNDED = SamplingParams(temperature=0.0)
# Steps run before timing: past every per-sequence window (the fake's penalty history is penalty_last_n
# tokens long), so that every timed step costs the same.
WARM_STEPS = 2 * GREEDY_UNBOUNDED.penalty_last_n


def prompt_tokens(index: int, n_tokens: int = PROMPT_TOKENS) -> tuple[int, ...]:
    """A printable prompt of n_tokens fake-vocabulary tokens, different for every slot index."""
    text = f"request {index:04d}: " + "tell me about the sea. " * n_tokens
    return tuple(text.encode()[:n_tokens])


@dataclass
class DecodingScheduler:
    """A scheduler whose slots all decode, and the sampled tokens one commit feeds back."""

    scheduler: Scheduler
    sequences: list[Sequence]
    sampled: MappingProxyType[int, SampledToken]

    def step(self) -> int:
        """One schedule() + commit() with a fixed sampled token per slot; returns the events produced."""
        plan = self.scheduler.schedule()
        return len(self.scheduler.commit(plan, self.sampled))


def decoding_scheduler(n_slots: int, vocab: Vocab) -> DecodingScheduler:
    config = SchedulerConfig(
        n_slots=n_slots, n_ctx_per_slot=UNBOUNDED_CTX, max_batch_tokens=max(MAX_BATCH_TOKENS, n_slots)
    )
    scheduler = Scheduler(config, vocab)
    sequences = [Sequence(index, Request(prompt_tokens(index), GREEDY_UNBOUNDED), 0) for index in range(n_slots)]
    for seq in sequences:
        scheduler.add([seq])
    sampled = MappingProxyType({seq.seq_id: SampledToken(DECODED_TOKEN) for seq in sequences})
    state = DecodingScheduler(scheduler, sequences, sampled)
    while any(seq.status is not SequenceStatus.DECODE for seq in sequences):  # the prompts, in chunks
        state.step()
    for _ in range(WARM_STEPS):
        state.step()
    return state


def fake_backend(n_slots: int) -> FakeBackend:
    return FakeBackend(FakeBackendConfig(n_slots=n_slots, n_ctx_per_slot=UNBOUNDED_CTX, n_batch=MAX_BATCH_TOKENS))


def decoding_engine(n_slots: int) -> Engine:
    """An engine over the fake backend, NOT started: the caller drives `_step()` on its own thread, so one
    benchmark round is exactly one step (with no event loop attached, events are built but not dispatched)."""
    engine = Engine(fake_backend(n_slots), EngineConfig(max_batch_tokens=MAX_BATCH_TOKENS, request_timeout_s=None))
    for index in range(n_slots):
        engine._scheduler.add([Sequence(index, Request(prompt_tokens(index), GREEDY_UNBOUNDED), 0)])
    while engine._scheduler.n_waiting or any(
        slot.sequence is None or slot.sequence.status is not SequenceStatus.DECODE for slot in engine._scheduler.slots
    ):
        engine._step()
    for _ in range(WARM_STEPS):
        engine._step()
    return engine
