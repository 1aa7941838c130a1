"""Benchmarks: the Python work the engine adds to every step, with the fake backend (no model).

- `schedule()` + `commit()` alone, every slot decoding: the scheduler's bookkeeping per step, without any
  decode or sampling. Divide by the llama_decode step time (~65 ms at 16 slots for SmolLM2 on 2 cores) for
  the overhead share; the target is < 3 %.
- The whole engine step at 16 slots (inbox, deadlines, schedule, the fake's decode and numpy sampling,
  commit, slot statuses): an upper bound on the engine thread's Python per step, since the fake's
  "model" and sampler are Python/numpy where llama.cpp's are C.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.harness import DECODED_TOKEN, decoding_engine, decoding_scheduler, fake_backend
from server.engine.sequence import SequenceStatus


@pytest.mark.parametrize("n_slots", [1, 16, 64])
def test_bench_scheduler_decode_step(benchmark: Any, n_slots: int) -> None:
    state = decoding_scheduler(n_slots, fake_backend(n_slots))
    n_tokens_before = len(state.sequences[-1].output_tokens)  # the sequence checked below

    n_events = benchmark(state.step)

    assert n_events == n_slots
    assert all(seq.status is SequenceStatus.DECODE for seq in state.sequences)
    generated = state.sequences[-1].output_tokens
    assert len(generated) > n_tokens_before and generated[-1] == DECODED_TOKEN
    assert [slot.index for slot in state.scheduler.slots if slot.sequence is not None] == list(range(n_slots))


def test_bench_engine_step_fake_backend_16_slots(benchmark: Any) -> None:
    engine = decoding_engine(16)
    steps_before = engine.stats().n_steps
    try:
        benchmark(engine._step)
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats.n_steps > steps_before
    assert stats.n_slots_busy == 16
    assert stats.n_generated_tokens >= 16 * (stats.n_steps - steps_before)
