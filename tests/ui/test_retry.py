"""The chat page's retries, in a real chromium against real servers: a 503 while the model is still loading and
a 429 from a full queue are shown plainly, waited out, retried by the page itself, and the answer then arrives.

Both are the server's own answers, not played ones: the 503 comes from an app whose loader holds the loaded
SmolLM2 engine back until the test lets it go; the 429 from a one-slot server without a queue
(`--max-queue 0`, whose `Retry-After` is 1 s) while another client holds the slot."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Page, Request, expect

from server.app import create_app
from server.engine.engine import Engine
from server.settings import Settings
from tests.integration.conftest import CacheHome, LiveServer, free_port, stop_server
from tests.ui.conftest import MODEL, serve
from tests.ui.test_chat import GENERATION_MS, last_answer, open_chat

LOAD_TIMEOUT_S = 120.0  # loading SmolLM2 on 2 busy cores takes seconds; this only bounds a broken run


@dataclass(frozen=True)
class LoadingServer:
    """An app in this process, served by uvicorn on a thread, whose model stays "loading" until `release`."""

    base_url: str
    loaded: threading.Event  # the real engine is built (the app still says "loading")
    release: threading.Event  # the test lets the loader hand the engine over


def held_back_engine(settings: Settings, loaded: threading.Event, release: threading.Event) -> Engine:
    """The loader thread: build the real engine, then hold it until the test says so (the app answers 503
    "still loading" all that while)."""
    from server.boot.loader import build_engine  # deferred, as the app does: it imports llama.cpp

    engine = build_engine(settings)
    loaded.set()
    if not release.wait(timeout=LOAD_TIMEOUT_S):
        engine.stop()
        raise RuntimeError("the test never released the engine")
    return engine


@contextmanager
def loading_server(tmp_path: Path, cache_home: CacheHome) -> Iterator[LoadingServer]:
    settings = Settings(
        model=MODEL,
        parallel=1,
        ctx_size=1024,
        threads=2,
        data_dir=tmp_path / "data",
        cache_dir=cache_home.qwen3_local,
        log_level="warning",
    )
    loaded, release = threading.Event(), threading.Event()
    app = create_app(settings, engine_factory=lambda: held_back_engine(settings, loaded, release))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="ui-loading-server", daemon=True)
    thread.start()
    try:
        assert loaded.wait(timeout=LOAD_TIMEOUT_S) and server.started, "the loading server did not come up"
        yield LoadingServer(f"http://127.0.0.1:{port}", loaded, release)
    finally:
        release.set()  # a failed test must not leave the loader waiting
        server.should_exit = True
        thread.join(timeout=30)


def chat_requests(page: Page) -> list[Request]:
    """Every POST /v1/chat/completions the page makes from now on, in order."""
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/chat/completions") else None)
    return requests


def status_of(request: Request) -> int:
    response = request.response()
    assert response is not None, request.url
    return response.status


def seconds_between(first: Request, second: Request) -> float:
    """The browser's own clock: when each request started (ms since the epoch), not when Python heard of it."""
    return (second.timing["startTime"] - first.timing["startTime"]) / 1000


def send(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()


def test_a_send_while_the_model_loads_is_retried_until_it_answers(
    page: Page, tmp_path: Path, ui_cache_home: CacheHome
) -> None:
    with loading_server(tmp_path, ui_cache_home) as server:
        health = httpx.get(server.base_url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["error"]["code"] == "model_loading"
        requests = chat_requests(page)
        page.goto(server.base_url + "/ui/")
        expect(page.get_by_label("Model")).to_have_value(MODEL)  # /v1/models answers while loading
        page.get_by_label("Max tokens").fill("24")
        page.get_by_label("Temperature").fill("0")
        send(page, "Say hello.")
        error = page.locator("#chat-error")
        expect(error).to_be_visible()
        expect(error).to_contain_text("The server is not ready (503): The model is still loading; retry shortly.")
        expect(error).to_contain_text(re.compile(r"Retrying in \d s…"))  # 1 s, then 2 s if this test is slow
        expect(page.get_by_role("button", name="Stop")).to_be_enabled()  # waiting to retry, not given up
        assert {status_of(r) for r in requests} == {503}
        server.release.set()  # the model is ready from now on: the page's next try must get the answer
        expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=GENERATION_MS)
        statuses = [status_of(r) for r in requests]
        assert len(statuses) >= 2 and set(statuses[:-1]) == {503} and statuses[-1] == 200, statuses
        expect(error).to_be_empty()
        assert last_answer(page).strip()
        assert seconds_between(requests[0], requests[1]) >= 0.9  # the 1 s back-off was waited out
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def queueless_server(tmp_path_factory: pytest.TempPathFactory, ui_cache_home: CacheHome) -> Iterator[LiveServer]:
    """One slot and no waiting queue: while a request holds the slot, the next gets 429 with Retry-After 1."""
    server = serve(tmp_path_factory.mktemp("ui-queueless"), ui_cache_home, "--max-queue", "0", parallel=1)
    yield server
    stop_server(server)


@contextmanager
def slot_held(server: LiveServer) -> Iterator[Callable[[], None]]:
    """Another client streams a long answer, so the server's only slot is busy until it hangs up: by calling
    the function this yields, or at the end of the block (the server then frees the slot)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server.api_url + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        # kept referenced: a dropped line iterator is closed, and closing it hangs up (the slot would free)
        lines = response.iter_lines()
        next(lines)  # the first chunk: the request holds the slot
        yield response.close


def test_a_full_queue_is_shown_waited_out_and_retried(page: Page, queueless_server: LiveServer) -> None:
    open_chat(page, queueless_server, max_tokens="24")
    requests = chat_requests(page)
    with slot_held(queueless_server) as hang_up:
        busy = httpx.post(
            queueless_server.api_url + "/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=10,
        )
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
        # the other client hangs up as soon as the page has its 429 (not when this busy test gets round to it):
        # the page's next try, a second later, finds the slot free or, at worst, another 429 and tries again
        page.on("response", lambda r: hang_up() if r.status == 429 and r.url.endswith("/v1/chat/completions") else None)
        send(page, "Say hello.")
        error = page.locator("#chat-error")
        expect(error).to_contain_text(re.compile(r"Too many requests \(429\): server is at capacity.*Retrying in 1 s…"))
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=GENERATION_MS)
    statuses = [status_of(r) for r in requests]
    assert statuses[0] == 429 and statuses[-1] == 200 and set(statuses[:-1]) == {429}, statuses
    expect(error).to_be_empty()
    assert last_answer(page).strip()
    gaps = [seconds_between(a, b) for a, b in pairwise(requests)]
    assert gaps and all(gap >= 0.9 for gap in gaps), gaps  # each retry waited out Retry-After: 1
