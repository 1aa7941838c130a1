"""llama.cpp's process-wide log, routed per owner: whole lines forwarded to `logging` and kept, so that a
failed call can quote what llama.cpp said and a load can be checked against the buffers it reported."""

from __future__ import annotations

import collections
import ctypes
import logging
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import llama_cpp.llama_cpp as llama

from bindings.gil_holding import gil_holding

logger = logging.getLogger(__name__)
# ggml_log_level (ggml.h); CONT continues the line of the previous call.
_LOG_DEBUG, _LOG_INFO, _LOG_WARN, _LOG_ERROR, _LOG_CONT = 1, 2, 3, 4, 5
_LOG_TO_LOGGING: Mapping[int, int] = MappingProxyType(
    {_LOG_DEBUG: logging.DEBUG, _LOG_INFO: logging.DEBUG, _LOG_WARN: logging.WARNING, _LOG_ERROR: logging.ERROR}
)
# Lines kept between two drains; bounds memory if llama.cpp logs a lot between them.
MAX_CAPTURED_LINES = 4096


class LogCapture:
    """One backend's share of llama.cpp's log: whole lines at INFO and above, forwarded to `logging`."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._lines: collections.deque[str] = collections.deque(maxlen=MAX_CAPTURED_LINES)
        self._partial = ""
        self._partial_level = _LOG_INFO

    def feed(self, level: int, text: str) -> None:
        if level != _LOG_CONT:
            if self._partial:
                self._emit(self._partial_level, self._partial)
                self._partial = ""
            self._partial_level = level
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            self._emit(self._partial_level, line)

    def drain(self) -> list[str]:
        """The lines captured since the last drain (and forget them)."""
        lines = list(self._lines)
        self._lines.clear()
        return lines

    def _emit(self, level: int, line: str) -> None:
        if not line.strip():
            return
        logging_level = _LOG_TO_LOGGING.get(level, logging.DEBUG)
        if self._log.isEnabledFor(logging_level):
            self._log.log(logging_level, "llama.cpp: %s", line)
        if level >= _LOG_INFO:
            self._lines.append(line)


def _route_llama_log(level: int, text: bytes | None, user_data: int | None) -> None:
    """llama.cpp's log callback: user_data points at the owning backend's py_object(LogCapture)."""
    message = text.decode("utf-8", errors="replace") if text else ""
    try:
        if user_data:
            capture = ctypes.cast(user_data, ctypes.POINTER(ctypes.py_object)).contents.value
            capture.feed(level, message)
        elif level >= _LOG_INFO and message.strip():
            logger.debug("llama.cpp: %s", message.rstrip("\n"))
    except Exception:  # an exception must never unwind into C
        logger.exception("llama.cpp log callback failed")


# A constant: llama.cpp keeps this pointer, so the function object lives as long as the module.
LLAMA_LOG_CALLBACK = llama.llama_log_callback(_route_llama_log)
_set_llama_log = gil_holding(llama.llama_log_set)


def route_llama_log(user_data: ctypes.c_void_p) -> None:
    """Point llama.cpp's log at the capture `user_data` points to, before a decode (see gil_holding.py)."""
    _set_llama_log(LLAMA_LOG_CALLBACK, user_data)


def failure_detail(log_lines: Sequence[str]) -> str:
    """The most telling lines of what llama.cpp logged while an operation failed."""
    telling = [line.strip() for line in log_lines if re.search(r"error|fail|invalid|unable|cannot", line, re.I)]
    chosen = telling[-3:] if telling else [line.strip() for line in log_lines[-2:]]
    return "; ".join(chosen) if chosen else "llama.cpp gave no reason"
