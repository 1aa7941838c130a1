"""A real PostgreSQL server (Debian's `postgresql` package, started by bench/postgres.py, which also runs it as the
`postgres` user when CI runs as root) for the audit tests, and the audit database URL of each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.postgres import ThrowawayPostgres

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine captures the running asyncio loop


@pytest.fixture(scope="session")
def postgres() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def audit_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    server: ThrowawayPostgres = request.getfixturevalue("postgres")
    return server.new_database()
