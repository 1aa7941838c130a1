"""Ollama's keep_alive: how long a model stays loaded after its last request.

"5m", "1h30m", "90s", "250ms" or a number of seconds; 0 unloads once the request is done; a negative value keeps
the model loaded for good."""

from __future__ import annotations

import re

FOREVER: None = None  # a keep_alive of "forever" is None: no expiry
DEFAULT_ON_DEMAND_S = 300.0  # Ollama's default for a model loaded on demand: 5 minutes

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


class KeepAliveError(ValueError):
    """The value is not a duration; the message says what is accepted."""


def parse_keep_alive(value: str | int | float) -> float | None:
    """Seconds to stay loaded after the last request; None: forever."""
    if isinstance(value, bool):
        raise KeepAliveError(f"keep_alive must be a duration, not {value!r}")
    if isinstance(value, int | float):
        return None if value < 0 else float(value)
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        return _parse_duration(text)
    return None if number < 0 else number


def _parse_duration(text: str) -> float | None:
    negative = text.startswith("-")
    body = text[1:] if negative else text
    if not body or _PART.sub("", body):
        raise KeepAliveError(
            f"keep_alive {text!r} is not a duration: use seconds (300), a duration such as '5m', '1h30m', '90s', "
            "0 to unload after the request, or -1 to keep the model loaded"
        )
    seconds = sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(body))
    return None if negative and seconds > 0 else seconds
