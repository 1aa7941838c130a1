"""The auth tests: in-process apps over the fake backend run on asyncio; the live SIGHUP test starts the real
`python -m server` (tests/integration's helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.auth.keys import add_key
from server.auth.principal import Limits


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "keys.json"


def make_key(path: Path, name: str, *scopes: str, rpm: int | None = None, tpm: int | None = None) -> str:
    return add_key(path, name, scopes or ("inference",), Limits(rpm, tpm))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
