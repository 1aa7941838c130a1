"""Handing callbacks from the engine thread to the event loop without giving the loop the GIL on the way.

asyncio's call_soon_threadsafe wakes the loop with a socket send, and CPython releases the GIL around every
socket call. The woken loop thread takes the GIL right there and runs what it was woken for (dispatching the
step's events, encoding SSE chunks, writing sockets) while the engine thread waits, between two decodes, to get
the GIL back, and llama.cpp's other compute threads spin. Measured on 2 cores (SmolLM2, one stream, the engine
in-process): ~136 µs on the engine thread per hand-off.

Here the wake-up is an eventfd written by libc's eventfd_write called with the GIL held (a ctypes.PyDLL
function does not release it). The woken loop thread waits for the GIL and gets it when the engine thread
releases it in its next llama_decode, so the loop's work runs beside the decode and not in front of it (~45 µs
per hand-off, the kernel's wake-up). Where there is no eventfd (not Linux), call_soon_threadsafe it is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

_Callback = Callable[..., object]


class LoopWaker(Protocol):
    """Runs callbacks on one event loop, in the order they were posted, from any thread."""

    def post(self, callback: _Callback, *args: Any) -> None:
        """Raises RuntimeError when the loop can no longer take callbacks."""

    def close(self) -> None:
        """Once no thread posts any more: run what is still pending (on the loop) and release the wake-up."""


class CallSoonWaker:
    """The portable hand-off: asyncio's call_soon_threadsafe (the loop may take the GIL during the wake-up)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def post(self, callback: _Callback, *args: Any) -> None:
        self._loop.call_soon_threadsafe(callback, *args)

    def close(self) -> None:
        """Nothing to release: call_soon_threadsafe's callbacks already wait in the loop's own queue."""


def _gil_holding_eventfd_write() -> Callable[[int, int], int] | None:
    """libc's eventfd_write(fd, value) as a function that keeps the GIL; None where libc has none."""
    if not hasattr(os, "eventfd"):
        return None
    try:
        function = ctypes.PyDLL(None, use_errno=True).eventfd_write
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_uint64]
    function.restype = ctypes.c_int
    return function


class EventfdWaker:
    """The hand-off through an eventfd that the loop watches; see the module docstring for why."""

    def __init__(self, loop: asyncio.AbstractEventLoop, write: Callable[[int, int], int]) -> None:
        """On the loop's thread."""
        self._loop = loop
        self._write = write
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pending: collections.deque[tuple[_Callback, tuple[Any, ...]]] = collections.deque()
        self._closed = False
        loop.add_reader(self._fd, self._on_wake)

    def post(self, callback: _Callback, *args: Any) -> None:
        if self._closed or self._loop.is_closed():  # as call_soon_threadsafe: nothing would ever run them
            raise RuntimeError("the event loop's wake-up is closed")
        self._pending.append((callback, args))  # deque.append is atomic: the loop may be draining meanwhile
        if self._write(self._fd, 1) != 0:
            raise RuntimeError(f"cannot wake the event loop: {os.strerror(ctypes.get_errno()) or 'eventfd_write'}")

    def _on_wake(self) -> None:
        # BlockingIOError: a drain after an earlier wake-up already ran these callbacks
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        self._run_pending()

    def _run_pending(self) -> None:
        while self._pending:
            callback, args = self._pending.popleft()
            try:
                callback(*args)
            except Exception:  # as asyncio does with a failing callback: log it, keep the loop serving
                log.exception("callback %r from the engine thread failed", callback)

    def close(self) -> None:
        """From any thread, once the posting thread has stopped. The fd stays open until the loop has stopped
        watching it, so no later file can be written to in its place."""
        if self._closed:
            return
        self._closed = True
        if self._on_loop_thread():
            self._close_on_loop()
            return
        try:
            self._loop.call_soon_threadsafe(self._close_on_loop)
        except RuntimeError:  # the loop is closed: nothing watches the fd, and what was pending has no reader
            os.close(self._fd)

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _close_on_loop(self) -> None:
        self._loop.remove_reader(self._fd)
        self._run_pending()
        os.close(self._fd)


def loop_waker(loop: asyncio.AbstractEventLoop) -> LoopWaker:
    """The best hand-off this platform has, created on the loop's thread."""
    write = _gil_holding_eventfd_write()
    if write is None:
        return CallSoonWaker(loop)
    try:
        return EventfdWaker(loop, write)
    except (OSError, NotImplementedError) as exc:  # no eventfd, or a loop that cannot watch file descriptors
        log.debug("eventfd wake-up unavailable (%s); using call_soon_threadsafe", exc)
        return CallSoonWaker(loop)
