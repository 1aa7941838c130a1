"""The live dashboard (server/ui/static/dashboard.js) in chromium, against the live SmolLM2 server: while a
background thread keeps chat requests coming, the numbers it polls once a second move and its charts fill."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.integration.conftest import CHAT_PROMPTS, LiveServer
from tests.ui.conftest import DOCS, MODEL


class Load:
    """Chat requests sent back to back from two threads until stopped."""

    def __init__(self, server: LiveServer, n_threads: int = 2) -> None:
        self.server = server
        self.stop = threading.Event()
        self.answered = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n_threads)]

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.server.api_url, timeout=60) as client:
            i = offset
            while not self.stop.is_set():
                prompt = CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
                i += 1
                answer = client.post(
                    "/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48},
                )
                if answer.status_code == 200:
                    self.answered += 1
                else:
                    self.failures.append(answer.text)


@pytest.fixture
def load(ui_server: LiveServer) -> Iterator[Load]:
    running = Load(ui_server)
    for thread in running.threads:
        thread.start()
    yield running
    running.stop.set()
    for thread in running.threads:
        thread.join(timeout=60)


def stat(page: Page, key: str) -> str:
    return page.locator(f"#panel-dashboard [data-stat={key}]").inner_text()


def number(text: str) -> float:
    match = re.match(r"[0-9.]+", text)
    assert match, text
    return float(match.group())


def test_the_numbers_move_under_load(ui_server: LiveServer, page: Page, load: Load) -> None:
    page.goto(ui_server.base_url + "/ui/")
    tab = page.get_by_role("tab", name="Dashboard")
    expect(tab).to_be_visible()  # no auth: the anonymous caller is admin
    tab.click()
    panel = page.locator("#panel-dashboard")
    expect(panel.get_by_role("status")).to_contain_text(f"{MODEL}: ready")
    expect(panel.locator("[data-stat=tokens-per-second]")).to_have_text(re.compile(r"^[0-9.]+$"))

    first = number(stat(page, "generated-tokens"))
    seen_rate = seen_busy = 0.0
    moved = False
    for _ in range(40):  # up to 20 s
        page.wait_for_timeout(500)
        seen_rate = max(seen_rate, number(stat(page, "tokens-per-second")))
        seen_busy = max(seen_busy, number(stat(page, "slots")))
        moved = moved or number(stat(page, "generated-tokens")) > first
        if moved and seen_rate > 0 and seen_busy > 0 and load.answered >= 2:
            break
    assert moved and seen_rate > 0 and seen_busy > 0, (moved, seen_rate, seen_busy)
    assert not load.failures, load.failures[:1]

    expect(panel.locator("[data-stat=ttft]")).to_have_text(re.compile(r"^[0-9.]+ m?s / [0-9.]+ m?s"))
    expect(panel.locator("[data-stat=itl]")).to_have_text(re.compile(r"^[0-9.]+ m?s / [0-9.]+ m?s"))
    expect(panel.locator("[data-stat=slots]")).to_contain_text("/ 4")
    expect(panel.locator("[data-stat=ram]")).to_contain_text("GiB")
    tokens_chart = panel.locator("figure[data-chart='Tokens per second'] polyline")
    expect(tokens_chart).to_have_attribute("points", re.compile(r"\S+ \S+ \S+"))  # several seconds drawn
    expect(panel.get_by_role("img", name=re.compile(r"^Tokens per second, last \d+ (s|min): now"))).to_be_visible()
    page.wait_for_timeout(3000)  # a few more seconds on the charts for the screenshot
    page.set_viewport_size({"width": 1280, "height": 760})
    page.screenshot(path=str(DOCS / "ui-dashboard.png"))


def test_polling_stops_while_the_page_is_hidden(ui_server: LiveServer, page: Page) -> None:
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if "/ui/api/stats" in request.url else None)
    page.goto(ui_server.base_url + "/ui/")
    page.get_by_role("tab", name="Dashboard").click()
    expect(page.locator("#panel-dashboard [data-stat=queue]")).to_have_text(re.compile(r"^\d+$"))
    page.wait_for_timeout(2500)
    assert len(polls) >= 2  # once a second
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_timeout(1200)  # a poll already in flight may finish
    hidden_count = len(polls)
    page.wait_for_timeout(2500)
    assert len(polls) == hidden_count


def test_each_gpu_is_shown_with_its_memory_and_utilisation(ui_server: LiveServer, page: Page) -> None:
    """The GPU card on a machine with two GPUs (the stats answered in place of this GPU-less server's)."""
    real = httpx.get(ui_server.base_url + "/ui/api/stats", timeout=30).json()
    gpus = [
        {
            "index": 0,
            "name": "H200",
            "memory_used_bytes": 40 << 30,
            "memory_total_bytes": 140 << 30,
            "utilization_ratio": 0.75,
        },
        {
            "index": 1,
            "name": "4060",
            "memory_used_bytes": 15 << 30,
            "memory_total_bytes": 16 << 30,
            "utilization_ratio": None,
        },
    ]
    page.route("**/ui/api/stats", lambda route: route.fulfill(json={**real, "gpus": gpus}))
    page.goto(ui_server.base_url + "/ui/")
    page.get_by_role("tab", name="Dashboard").click()
    expect(page.locator("#panel-dashboard [data-stat=gpu]")).to_have_text(
        "40.0 GiB / 140.0 GiB, 15.0 GiB / 16.0 GiB H200: 75 %, 4060: –"
    )
