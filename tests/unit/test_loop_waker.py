"""The engine thread's hand-off to the event loop (server/engine/loop_waker.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from server.engine.loop_waker import CallSoonWaker, EventfdWaker, loop_waker

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """asyncio.run on the standard loop, and on uvloop's (what uvicorn runs the server on when installed)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run_on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)

    return run_on_loop


def eventfd_waker(loop: asyncio.AbstractEventLoop) -> EventfdWaker:
    """What the engine gets on Linux, where the server runs (CallSoonWaker is the fallback elsewhere)."""
    waker = loop_waker(loop)
    assert isinstance(waker, EventfdWaker)
    return waker


@pytest.mark.parametrize("make", [eventfd_waker, CallSoonWaker], ids=["eventfd", "call_soon"])
def test_callbacks_from_another_thread_run_on_the_loop_in_order(
    make: Callable[[asyncio.AbstractEventLoop], EventfdWaker | CallSoonWaker], run: Run
) -> None:
    async def scenario() -> tuple[list[int], set[int]]:
        loop = asyncio.get_running_loop()
        waker = make(loop)
        ran: list[int] = []
        threads: set[int] = set()
        done = asyncio.Event()

        def record(value: int) -> None:
            ran.append(value)
            threads.add(threading.get_ident())
            if value == 199:
                done.set()

        def poster() -> None:
            for value in range(200):
                waker.post(record, value)

        await asyncio.to_thread(poster)
        await asyncio.wait_for(done.wait(), 5)
        waker.close()
        return ran, threads

    ran, threads = run(scenario())
    assert ran == list(range(200))
    assert threads == {threading.get_ident()}  # asyncio.run's loop runs on this thread


def test_posting_keeps_the_gil_so_the_loop_runs_nothing_meanwhile(long_switch_interval: None, run: Run) -> None:
    """The point of the eventfd waker: the loop, woken by the first post, gets the GIL only when the posting
    thread gives it up itself (the engine: in llama_decode; here: when the posting thread ends), not inside a
    post."""

    async def scenario() -> tuple[list[int], int]:
        waker = eventfd_waker(asyncio.get_running_loop())
        ran: list[int] = []
        seen_while_posting: list[int] = []
        all_ran = asyncio.Event()

        def record(value: int) -> None:
            ran.append(value)
            if len(ran) == 50:
                all_ran.set()

        def poster() -> None:
            for value in range(50):
                waker.post(record, value)
                seen_while_posting.append(len(ran))

        await asyncio.to_thread(poster)
        await asyncio.wait_for(all_ran.wait(), 5)
        waker.close()
        return seen_while_posting, len(ran)

    seen_while_posting, n_ran = run(scenario())
    assert n_ran == 50
    assert set(seen_while_posting) == {0}


def test_close_from_another_thread_runs_what_is_still_pending_then_releases_the_fd(run: Run) -> None:
    """The engine thread's last events (every unfinished request's error) are posted just before stop() closes
    the waker from another thread: close() must not drop them."""

    async def scenario() -> tuple[list[str], int]:
        waker = eventfd_waker(asyncio.get_running_loop())
        ran: list[str] = []

        def post_then_close() -> None:
            waker.post(ran.append, "last event")
            waker.close()  # queues the loop-side close ahead of the wake-up's reader callback

        await asyncio.to_thread(post_then_close)
        for _ in range(100):
            if ran:
                break
            await asyncio.sleep(0.01)
        return ran, waker._fd

    ran, fd = run(scenario())
    assert ran == ["last event"]
    with pytest.raises(OSError):
        os.fstat(fd)


def test_close_on_the_loop_thread_runs_pending_callbacks_at_once(run: Run) -> None:
    async def scenario() -> list[str]:
        waker = eventfd_waker(asyncio.get_running_loop())
        ran: list[str] = []
        await asyncio.to_thread(waker.post, ran.append, "pending")
        waker.close()  # before the loop has had a turn to read the wake-up
        return ran

    assert run(scenario()) == ["pending"]


def test_post_after_close_is_refused(run: Run) -> None:
    async def scenario() -> None:
        waker = eventfd_waker(asyncio.get_running_loop())
        waker.close()
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.to_thread(waker.post, print, "too late")

    run(scenario())


def test_a_failing_callback_is_logged_and_the_next_one_still_runs(caplog: pytest.LogCaptureFixture, run: Run) -> None:
    async def scenario() -> list[str]:
        waker = eventfd_waker(asyncio.get_running_loop())
        ran: list[str] = []

        def fail() -> None:
            raise ValueError("broken callback")

        def post_both() -> None:
            waker.post(fail)
            waker.post(ran.append, "after")

        await asyncio.to_thread(post_both)
        for _ in range(100):
            if ran:
                break
            await asyncio.sleep(0.01)
        waker.close()
        return ran

    with caplog.at_level(logging.ERROR, logger="server.engine.loop_waker"):
        assert run(scenario()) == ["after"]
    assert "broken callback" in caplog.text


def test_close_after_the_loop_closed_releases_the_fd_quietly(run: Run) -> None:
    wakers: list[EventfdWaker] = []

    async def scenario() -> None:
        wakers.append(eventfd_waker(asyncio.get_running_loop()))

    run(scenario())  # the loop is closed once run() returns
    closer = threading.Thread(target=wakers[0].close)
    closer.start()
    closer.join()
    with pytest.raises(OSError):
        os.fstat(wakers[0]._fd)


def test_post_once_the_loop_is_closed_is_refused(run: Run) -> None:
    """As call_soon_threadsafe: callbacks for a loop that will never run them must not pile up."""
    wakers: list[EventfdWaker] = []

    async def scenario() -> None:
        wakers.append(eventfd_waker(asyncio.get_running_loop()))

    run(scenario())
    with pytest.raises(RuntimeError, match="closed"):
        wakers[0].post(print, "too late")
    wakers[0].close()
