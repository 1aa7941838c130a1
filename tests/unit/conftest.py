from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def long_switch_interval() -> Iterator[None]:
    """No forced GIL switch during a test: a thread runs Python only when the GIL holder releases it itself."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    yield
    sys.setswitchinterval(previous)
