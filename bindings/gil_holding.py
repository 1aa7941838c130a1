"""llama.cpp calls of a few microseconds made without releasing the GIL.

ctypes releases the GIL around every foreign call. On the engine thread, between two decodes, that hands the
GIL to an event loop thread waiting for it (woken by the previous step's tokens, or by a client), for its whole
Python stretch: SSE chunks, socket writes, ~0.1-0.4 ms. The engine thread waits that long to sample and start
the next decode while llama.cpp's other compute threads spin (measured with SmolLM2 single stream: a log-route
call of ~1 µs took 42 µs per step on average once the hand-off kept the GIL). Released only in llama_decode,
the GIL lets the loop run beside the decode instead. Only for calls that never block; one that calls back into
Python (llama.cpp's log callback, on an error) is fine: the callback takes the GIL this thread already holds.
"""

from __future__ import annotations

import ctypes
from typing import Any


def gil_holding(function: Any, restype: Any = None) -> Any:
    """`function` (one of llama-cpp-python's ctypes functions) as a function that keeps the GIL; `restype`
    replaces its result type (e.g. c_void_p for an address as a plain int)."""
    address = ctypes.cast(function, ctypes.c_void_p).value
    if address is None:
        raise ValueError(f"{function!r} has no address")
    prototype = ctypes.PYFUNCTYPE(function.restype if restype is None else restype, *function.argtypes)
    return prototype(address)
