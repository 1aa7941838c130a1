"""bindings/gil_holding.py: short llama.cpp calls that keep the GIL, so that no event loop thread slips in
between two decodes."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import llama_cpp.llama_cpp as llama

from bindings.gil_holding import gil_holding


def libc_usleep() -> Any:
    usleep = ctypes.CDLL(None).usleep
    usleep.argtypes = [ctypes.c_uint]
    usleep.restype = ctypes.c_int
    return usleep


def other_thread_steps_during(call: Callable[[], Any], n_calls: int = 20) -> int:
    """How many steps a thread that wants the GIL all along made while this one made n_calls calls."""
    steps = 0
    go = threading.Event()
    stop = threading.Event()

    def competitor() -> None:
        nonlocal steps
        go.wait()  # blocks without the GIL; once set, it wants the GIL for good
        while not stop.is_set():
            steps += 1

    thread = threading.Thread(target=competitor)
    thread.start()
    go.set()  # this thread keeps the GIL: the competitor now waits for it
    for _ in range(n_calls):
        call()
    during = steps
    stop.set()
    thread.join()
    return during


def test_the_wrapped_call_returns_what_the_library_call_does() -> None:
    assert gil_holding(llama.llama_max_devices)() == llama.llama_max_devices() > 0
    assert gil_holding(llama.llama_max_devices, ctypes.c_int64)() == llama.llama_max_devices()


def test_a_gil_holding_call_lets_no_other_thread_run(long_switch_interval: None) -> None:
    usleep = gil_holding(libc_usleep())
    assert other_thread_steps_during(lambda: usleep(200)) == 0


def test_a_plain_ctypes_call_lets_the_waiting_thread_run() -> None:
    """Why gil_holding exists: the same call through ctypes hands the GIL to the thread waiting for it."""
    usleep = libc_usleep()
    assert other_thread_steps_during(lambda: usleep(200)) > 0
