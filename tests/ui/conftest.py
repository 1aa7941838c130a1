"""Browser tests of the web UI (/ui): Playwright's sync API driving Debian's chromium, headless, against a
real `python -m server` on SmolLM2 (started as tests/integration/conftest.py starts its live servers).

Fixtures: `ui_server` (a live server, no auth), `browser` (one chromium per test module), `page` (a fresh
context and page per test, closed after it). Playwright never downloads a browser: it runs /usr/bin/chromium
(`.ci/run` installs Debian's chromium package when it is missing)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.integration.conftest import CacheHome, LiveServer, start_server, stop_server

CHROMIUM = os.environ.get("QWEN3_LOCAL_TEST_CHROMIUM", "/usr/bin/chromium")
MODEL = "smollm2-135m-instruct"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def serve(
    tmp_path: Path, cache_home: CacheHome, *extra: str, parallel: int = 4, ctx_per_slot: int = 1024
) -> LiveServer:
    """A live SmolLM2 server with these extra CLI arguments (--ctx-size is per slot); the caller stops it with
    `stop_server`."""
    args = ["--model", MODEL, "--parallel", str(parallel), "--ctx-size", str(ctx_per_slot)]
    args += ["--threads", "2", *extra]
    return start_server(args, tmp_path / "server.log", cache_home)


@pytest.fixture(scope="session")
def ui_cache_home(tmp_path_factory: pytest.TempPathFactory) -> CacheHome:
    return CacheHome(tmp_path_factory.mktemp("ui-cache-home"))


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory, ui_cache_home: CacheHome) -> Iterator[LiveServer]:
    """One live SmolLM2 server without auth for the session's UI tests (4 slots of 1024 tokens)."""
    server = serve(tmp_path_factory.mktemp("ui-server"), ui_cache_home)
    yield server
    stop_server(server)


# Playwright's sync API runs an event loop of its own while it is open: module scope closes it before any other
# module's async tests run (pytest-asyncio cannot start a loop inside a running one).
@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (see .ci/run)"
    chromium = playwright_driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    yield chromium
    chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page in its own context (empty localStorage and sessionStorage), 1280x800, 15 s timeouts."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    new_page = context.new_page()
    yield new_page
    context.close()
