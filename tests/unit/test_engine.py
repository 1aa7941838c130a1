"""The engine thread and its asyncio bridge, with the fake backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from bindings.protocol import SamplingParams
from server.engine.engine import SLOT_STATUS_REFRESH_S, Engine, EngineConfig, SlotStatus
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.engine.request import FinishReason, Request, TokenEvent
from server.errors import ContextLengthExceededError, InvalidRequestError, QueueFullError, ServiceUnavailableError

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def run_with_engine(
    body: Callable[[Engine, FakeBackend], Awaitable[None]],
    backend_config: FakeBackendConfig | None = None,
    engine_config: EngineConfig | None = None,
) -> None:
    async def main() -> None:
        backend = FakeBackend(backend_config or FakeBackendConfig())
        engine = Engine(backend, engine_config or EngineConfig(max_batch_tokens=64))
        engine.start()
        try:
            await body(engine, backend)
        finally:
            engine.stop()

    asyncio.run(main())


async def collect(engine: Engine, request: Request) -> list[TokenEvent]:
    return [event async for event in engine.submit(request)]


def text_of(events: list[TokenEvent], choice: int = 0) -> str:
    return "".join(e.text for e in events if e.choice_index == choice)


def request(prompt: str, params: SamplingParams = GREEDY, **kwargs: object) -> Request:
    return Request(tuple(prompt.encode()), params, **kwargs)  # type: ignore[arg-type]


def test_concurrent_requests_equal_their_solo_runs() -> None:
    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(12)]

    async def body(engine: Engine, backend: FakeBackend) -> None:
        solo = [text_of(await collect(engine, request(p))) for p in prompts]
        together = await asyncio.gather(*(collect(engine, request(p)) for p in prompts))
        assert [text_of(events) for events in together] == solo
        assert max(len(b) for b in backend.batches) == 4, "all four slots decoded together"
        usage = together[0][-1]
        assert usage.n_generated_tokens == 12 and usage.n_prompt_tokens == len(prompts[0])

    run_with_engine(body)


def test_queue_full_is_refused_with_retry_after() -> None:
    async def body(engine: Engine, backend: FakeBackend) -> None:
        long = replace(GREEDY, max_tokens=40)
        streams = [engine.submit(request(f"r{i}", long)) for i in range(3)]  # 1 slot + 2 queued
        with pytest.raises(QueueFullError) as excinfo:
            engine.submit(request("one too many", long))
        assert excinfo.value.retry_after_s >= 1
        for stream in streams:
            stream.cancel()

    run_with_engine(
        body,
        FakeBackendConfig(n_slots=1, step_delay_s=0.01),
        EngineConfig(max_batch_tokens=64, max_queue=2),
    )


def test_validation_errors_are_raised_at_submit() -> None:
    async def body(engine: Engine, backend: FakeBackend) -> None:
        with pytest.raises(ContextLengthExceededError, match="context is 64"):
            engine.submit(request("x" * 60, replace(GREEDY, max_tokens=10)))
        with pytest.raises(ContextLengthExceededError):
            engine.submit(request("x" * 64))
        with pytest.raises(InvalidRequestError, match="slots"):
            engine.submit(request("x", n=5))
        with pytest.raises(InvalidRequestError, match="empty"):
            engine.submit(Request((), GREEDY))
        with pytest.raises(InvalidRequestError, match="token ids"):
            engine.submit(Request((1, 100_000), GREEDY))
        events = await collect(engine, request("still serving"))
        assert events[-1].finish_reason is FinishReason.LENGTH

    run_with_engine(body, FakeBackendConfig(n_ctx_per_slot=64))


def test_submit_before_start_is_unavailable() -> None:
    engine = Engine(FakeBackend())
    with pytest.raises(ServiceUnavailableError):
        engine.submit(request("x"))


def test_cancel_mid_stream_frees_the_slot() -> None:
    async def body(engine: Engine, backend: FakeBackend) -> None:
        stream = engine.submit(request("endless", replace(GREEDY, max_tokens=60)))
        seen = 0
        async for _event in stream:
            seen += 1
            if seen == 3:
                break  # the reader leaves: closing the iterator cancels the request
        for _ in range(100):
            if engine.slots()[0].state == "idle":
                break
            await asyncio.sleep(0.01)
        assert engine.slots()[0].state == "idle"
        events = await collect(engine, request("next one"))
        assert events[-1].finish_reason is FinishReason.LENGTH
        assert backend.n_live_samplers() == 0

    run_with_engine(body, FakeBackendConfig(n_slots=1, step_delay_s=0.005))


def test_failed_decode_fails_only_that_batch() -> None:
    poison = ord("#")

    async def body(engine: Engine, backend: FakeBackend) -> None:
        bad = await collect(engine, request("bad # prompt"))
        assert bad[-1].finish_reason is FinishReason.ERROR
        assert "injected decode failure" in (bad[-1].error or "")
        good = await collect(engine, request("good prompt"))
        assert good[-1].finish_reason is FinishReason.LENGTH
        assert engine.stats().n_decode_errors == 1
        assert engine.stats().n_requests_failed == 1

    run_with_engine(body, FakeBackendConfig(fail_on_token=poison))


def test_request_deadline_times_out() -> None:
    async def body(engine: Engine, backend: FakeBackend) -> None:
        slow = request("slow", replace(GREEDY, max_tokens=60), deadline=time.monotonic() + 0.1)
        events = await collect(engine, slow)
        assert events[-1].finish_reason is FinishReason.TIMEOUT
        assert 0 < sum(len(e.token_ids) for e in events) < 60

    run_with_engine(body, FakeBackendConfig(step_delay_s=0.01))


def test_stop_fails_unfinished_requests() -> None:
    async def main() -> None:
        engine = Engine(FakeBackend(FakeBackendConfig(n_slots=1, step_delay_s=0.01)))
        engine.start()
        stream = engine.submit(request("forever", replace(GREEDY, max_tokens=60)))
        iterator = aiter(stream)
        await anext(iterator)
        engine.stop()
        rest = [event async for event in iterator]
        assert rest[-1].finish_reason is FinishReason.ERROR
        assert rest[-1].error == "server shutting down"

    asyncio.run(main())


def test_stats_and_slots_report_activity() -> None:
    async def body(engine: Engine, backend: FakeBackend) -> None:
        stream = engine.submit(request("watch me", replace(GREEDY, max_tokens=30)))
        iterator = aiter(stream)
        await anext(iterator)
        busy = [s for s in engine.slots() if s.state != "idle"]
        assert len(busy) == 1 and busy[0].request_id == stream.request_id and busy[0].n_prompt_tokens == 8
        assert engine.stats().n_slots_busy == 1
        async for _ in iterator:
            pass
        stats = engine.stats()
        assert stats.n_generated_tokens == 30 and stats.n_requests_finished == 1 and stats.n_steps >= 30

    run_with_engine(body, FakeBackendConfig(step_delay_s=0.002))


def test_slot_snapshot_follows_a_long_decode_without_a_rebuild_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every slot each step costs a single stream ~0.6% of its speed: the snapshot is rebuilt when a
    slot gains or ends a choice, and at most every SLOT_STATUS_REFRESH_S in between, yet still moves."""
    rebuilds = 0
    read_slot_statuses = Engine._read_slot_statuses

    def counted(engine: Engine) -> list[SlotStatus]:
        nonlocal rebuilds
        rebuilds += 1
        return read_slot_statuses(engine)

    monkeypatch.setattr(Engine, "_read_slot_statuses", counted)

    async def body(engine: Engine, backend: FakeBackend) -> None:
        nonlocal rebuilds
        stream = engine.submit(request("long", replace(GREEDY, max_tokens=150)))
        iterator = aiter(stream)
        await anext(iterator)
        rebuilds = 0
        started = time.monotonic()
        seen_generated: list[int] = []
        async for _ in iterator:
            [busy] = [s for s in engine.slots() if s.state != "idle"] or [None]
            if busy is not None:
                seen_generated.append(busy.n_generated_tokens)
        assert len(set(seen_generated)) >= 3  # the snapshot moved during the decode
        assert engine.stats().n_steps >= 150
        periodic = (time.monotonic() - started) / SLOT_STATUS_REFRESH_S  # ~0.4 s of 2 ms steps: ~8, not 150
        assert rebuilds <= periodic + 3  # + the choice's end and the engine going idle

    run_with_engine(body, FakeBackendConfig(step_delay_s=0.002))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Yield to the engine thread until condition() holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


CACHED = EngineConfig(max_batch_tokens=64, prompt_cache_bytes=1 << 20)


def test_a_failed_prompt_cache_load_fails_one_request_and_the_next_prefills_cold() -> None:
    conversation = "a conversation worth keeping in RAM"
    solo: list[str] = []

    async def cold(engine: Engine, backend: FakeBackend) -> None:
        solo.append(text_of(await collect(engine, request(conversation + " again"))))

    async def body(engine: Engine, backend: FakeBackend) -> None:
        await collect(engine, request(conversation, replace(GREEDY, max_tokens=2)))
        await until(lambda: backend.n_stashed() == 1)  # the idle engine saved the slot
        await collect(engine, request("another takes the only slot", replace(GREEDY, max_tokens=2)))
        await until(lambda: backend.n_stashed() == 2)
        backend.failing_ops = {"load"}  # the entry cannot be read back, now or ever
        failed = await collect(engine, request(conversation + " again"))
        assert failed[-1].finish_reason is FinishReason.ERROR and "injected load failure" in (failed[-1].error or "")
        retry = await collect(engine, request(conversation + " again"))
        assert retry[-1].finish_reason is FinishReason.LENGTH and retry[-1].n_cached_tokens == 0
        assert text_of(retry) == solo[0]
        # the failed load's entry is dropped, and the idle engine stashes the retry's slot: the backend ends with
        # "another ..." and the retry (a third entry would be an orphan), exactly what the index knows
        await until(lambda: len(backend.stashed_entry_ids()) == 2)
        assert backend.stashed_entry_ids() == engine._scheduler.prompt_cache_entry_ids()

    run_with_engine(cold, FakeBackendConfig(n_slots=1))
    run_with_engine(body, FakeBackendConfig(n_slots=1), CACHED)


def test_an_idle_engine_stashes_its_slots_and_reports_the_cache() -> None:
    async def body(engine: Engine, backend: FakeBackend) -> None:
        first = await collect(
            engine, request("stashed while the engine has nothing to do", replace(GREEDY, max_tokens=2))
        )
        n_tokens = first[-1].n_prompt_tokens + 1  # the prompt and the generated token fed back
        await until(lambda: backend.n_stashed() == 1)
        stats = engine.stats()
        assert stats.prompt_cache_bytes == n_tokens * backend.config.state_bytes_per_token == backend.stashed_bytes()
        assert stats.prompt_cache_budget_bytes == 1 << 20
        n_stashes = sum(op.kind == "stash" for op in backend.ops)
        await collect(engine, request("takes the slot", replace(GREEDY, max_tokens=2)))
        assert sum(op.kind == "stash" for op in backend.ops) == n_stashes, "already saved: no copy at admission"
        returning = await collect(engine, request("stashed while the engine has nothing to do, back"))
        assert returning[-1].n_cached_tokens > 0
        stats = engine.stats()
        assert (stats.n_prompt_cache_hits, stats.n_prompt_cache_misses) == (1, 2)

    run_with_engine(body, FakeBackendConfig(n_slots=1), CACHED)


def test_every_token_reaches_its_stream_exactly_once() -> None:
    # Events cross from the engine thread to the event loop once per step: each token must arrive once, in
    # order, and the text must be exactly its pieces.
    async def body(engine: Engine, backend: FakeBackend) -> None:
        streams = await asyncio.gather(*(collect(engine, request(f"prompt {i} " * (i + 1))) for i in range(6)))
        for events in streams:
            tokens = [token for event in events for token in event.token_ids]
            assert len(tokens) == GREEDY.max_tokens
            assert [event.n_generated_tokens for event in events] == list(range(1, len(tokens) + 1))
            assert text_of(events) == b"".join(backend.piece(token) for token in tokens).decode()
            assert [event.finish_reason for event in events].count(FinishReason.LENGTH) == 1

    run_with_engine(body)


def test_a_stream_interval_merges_quick_steps_but_never_delays_the_first_or_last_token() -> None:
    # 5 ms steps and a 200 ms interval: the tokens after the first travel in groups of several steps; the text,
    # the token count and the finish are the same as with every step handed over at once.
    params = replace(GREEDY, max_tokens=24)

    async def run(interval_s: float) -> list[TokenEvent]:
        events: list[TokenEvent] = []

        async def body(engine: Engine, backend: FakeBackend) -> None:
            events.extend(await collect(engine, request("merge me ", params)))

        await asyncio.to_thread(
            run_with_engine,
            body,
            FakeBackendConfig(step_delay_s=0.005),
            EngineConfig(max_batch_tokens=64, stream_interval_s=interval_s),
        )
        return events

    each_step = asyncio.run(run(0.0))
    merged = asyncio.run(run(0.200))  # wide, so that a loaded CI machine still merges
    assert len(each_step) == 24, "one event per step without an interval"
    assert text_of(merged) == text_of(each_step)
    assert [t for e in merged for t in e.token_ids] == [t for e in each_step for t in e.token_ids]
    assert merged[0].token_ids == each_step[0].token_ids, "the first token is handed over alone"
    assert merged[-1].finish_reason == FinishReason.LENGTH and merged[-1].n_generated_tokens == 24
    assert len(merged) <= 24 // 3, f"steps were merged: {[len(e.token_ids) for e in merged]}"
