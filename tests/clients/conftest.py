"""Real client libraries (the openai SDK, langchain-openai, instructor) against the live SmolLM2 server.

The server is tests/integration's `smollm2_server` (a real `python -m server` process, offline, caches in a
temporary home). These tests check what the clients themselves do with our answers: parse them into the
caller's Pydantic models, read tool calls, and do so on the first try (no client-side retries)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

# The live-server fixtures, shared with tests/integration (imported fixtures register in this directory).
from tests.clients.counting import CountedHttp
from tests.integration.conftest import LiveServer, live_cache_home, smollm2_server

__all__ = ["live_cache_home", "smollm2_server"]


@pytest.fixture(autouse=True)
def _no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """LangChain would trace to LangSmith if the caller's environment asked it to: these tests stay offline."""
    for variable in ("LANGCHAIN_TRACING_V2", "LANGSMITH_TRACING", "LANGCHAIN_API_KEY", "LANGSMITH_API_KEY"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def client(smollm2_server: LiveServer) -> openai.OpenAI:
    """The official SDK pointed at the live server; no retries, so a bad answer fails the test at once."""
    return openai.OpenAI(base_url=smollm2_server.api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def counted_http() -> Iterator[CountedHttp]:
    counted = CountedHttp()
    yield counted
    counted.client.close()
