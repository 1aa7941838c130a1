"""Engines of several models share the cores: each busy one decodes on its share, a lone busy one on all of
them (server/engine/core_share.py), as the engines tell their backends before each decode."""

from __future__ import annotations

import asyncio

import pytest

from bindings.protocol import SamplingParams
from server.engine.core_share import CoreShare
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.engine.request import Request
from server.fleet.spec import model_specs
from server.settings import Settings


def test_busy_engines_split_the_threads_and_an_idle_one_gives_its_share_back() -> None:
    share = CoreShare(4)
    assert share.claim(1) == 4, "alone: every thread"
    assert share.claim(2) == 2 and share.claim(1) == 2, "two busy engines: half each"
    assert share.claim(3) == 1, "three on four threads: one each, never more than the cores"
    share.release(2)
    share.release(3)
    assert share.claim(1) == 4 and share.n_busy == 1
    share.release(1)
    share.release(1)  # releasing twice is harmless (an engine that stops while idle)
    assert share.n_busy == 0


def test_a_share_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        CoreShare(0)


def test_two_engines_decode_on_half_the_cores_together_and_on_all_of_them_alone() -> None:
    async def main() -> tuple[list[int], list[int]]:
        share = CoreShare(2)
        slow = FakeBackendConfig(step_delay_s=0.01)
        backends = [FakeBackend(slow), FakeBackend(slow)]
        engines = [Engine(b, EngineConfig(max_batch_tokens=64), core_share=share) for b in backends]
        for engine in engines:
            engine.start()
        try:

            async def run(engine: Engine, max_tokens: int) -> None:
                params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
                async for _ in engine.submit(Request(tuple(b"shared cores"), params)):
                    pass

            # both busy at once, then the second one alone (the first has finished its short answer)
            await asyncio.gather(run(engines[0], 4), run(engines[1], 40))
        finally:
            for engine in engines:
                engine.stop()
        return backends[0].thread_counts, backends[1].thread_counts

    first, second = asyncio.run(main())
    assert 1 in first and 1 in second, (first, second)
    assert second[-1] == 2, f"alone again, the second engine took both cores back: {second}"
    assert all(n in (1, 2) for n in first + second)


def test_served_models_without_threads_of_their_own_share_the_cores() -> None:
    settings = Settings(model=["a.gguf", "b.gguf"])
    assert [spec.shares_cores for spec in model_specs(settings)] == [True, True]
    assert [spec.shares_cores for spec in model_specs(Settings(model=["a.gguf"]))] == [False]
    assert [spec.shares_cores for spec in model_specs(Settings(model=["a.gguf", "b.gguf"], threads=2))] == [
        False,
        False,
    ], "--threads given: each engine keeps it"
