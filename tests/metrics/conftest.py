"""The in-process metrics tests run on asyncio (anyio's pytest plugin; the engine captures the running loop)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
