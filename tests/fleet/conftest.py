"""The fleet tests: in-process apps over fake backends on asyncio (helpers.py); live ones over real llama.cpp."""

from __future__ import annotations

import pytest

from tests.integration.conftest import CacheHome


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def fleet_cache_home(tmp_path_factory: pytest.TempPathFactory) -> CacheHome:
    """A temporary cache home for the live fleet server (tests/integration's helpers)."""
    return CacheHome(tmp_path_factory.mktemp("fleet-cache-home"))
