"""The chat page in a real chromium against a live SmolLM2 server: streaming, Stop, the context meter, keys."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.auth.conftest import make_key
from tests.integration.conftest import CacheHome, LiveServer, stop_server
from tests.ui.conftest import DOCS, serve

KEY = "ui-test-key-0123456789"
GENERATION_MS = 180_000  # an answer's whole time on 2 busy cores (SmolLM2 streams tens of tokens a second alone)


def open_chat(page: Page, server: LiveServer, *, temperature: str = "0", max_tokens: str = "256") -> None:
    page.goto(server.base_url + "/ui/")
    expect(page.get_by_label("Model")).to_have_value("smollm2-135m-instruct")
    page.get_by_label("Temperature").fill(temperature)
    page.get_by_label("Max tokens").fill(max_tokens)


def watch_answer(page: Page) -> None:
    """Record every distinct length the last answer's text takes, as the page renders it."""
    page.evaluate(
        """() => {
            window.answerLengths = [];
            new MutationObserver(() => {
                const answers = document.querySelectorAll('#messages .msg.assistant .content');
                const text = answers.length ? answers[answers.length - 1].textContent : '';
                if (text.length && window.answerLengths.at(-1) !== text.length) window.answerLengths.push(text.length);
            }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
        }"""
    )


def last_answer(page: Page) -> str:
    return page.locator("#messages .msg.assistant .content").last.inner_text()


def test_answer_streams_as_markdown_in_several_updates(page: Page, ui_server: LiveServer) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    open_chat(page, ui_server)
    watch_answer(page)
    page.get_by_label("Message").fill("Write a Python function that adds two numbers. Use a code block.")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("button", name="Stop")).to_be_enabled()
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=GENERATION_MS)
    lengths = page.evaluate("window.answerLengths")
    assert len(lengths) >= 3, lengths  # the text grew in several steps, not in one piece at the end
    # Markdown is re-rendered as it grows (a code fence closes), so the lengths need not only rise
    answer = page.locator("#messages .msg.assistant").last
    expect(answer.locator("pre code.hljs")).to_be_visible()  # a fenced block, rendered and highlighted
    assert "def " in last_answer(page)
    expect(page.get_by_role("button", name="Regenerate")).to_be_enabled()
    redirect = httpx.get(ui_server.base_url + "/ui", timeout=5)
    assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/"
    # fully offline: every file and call goes to the server itself (no CDN, no fonts from elsewhere)
    assert requested and all(url.startswith(ui_server.base_url + "/") for url in requested), requested
    assert any(url.endswith("/vendor/marked.esm.js") for url in requested)
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "ui-chat.png"))
    # the conversation is kept in localStorage: a reload shows it again
    page.reload()
    expect(page.locator("#messages .msg.user")).to_have_text(
        ["user" + "Write a Python function that adds two numbers. Use a code block."]
    )
    expect(page.locator("#messages .msg.assistant pre code")).to_be_visible()


def idle_slots(server: LiveServer) -> bool:
    slots = httpx.get(server.base_url + "/slots", timeout=5).json()
    return all(slot["state"] == "idle" for slot in slots)


def test_stop_ends_the_stream_and_frees_the_slot(page: Page, ui_server: LiveServer) -> None:
    # greedy: sampled, a 135M model sometimes ends its count before the stream is long enough to stop
    open_chat(page, ui_server, temperature="0", max_tokens="900")
    page.get_by_label("Message").fill("Count from 1 to 1000, one number per line.")
    page.keyboard.press("Enter")  # Enter sends
    expect(page.get_by_role("button", name="Stop")).to_be_enabled()
    page.wait_for_function(
        "() => { const a = document.querySelectorAll('#messages .msg.assistant .content');"
        " return a.length && a[a.length - 1].textContent.length > 40; }",
        timeout=GENERATION_MS,
    )
    assert not idle_slots(ui_server)  # generating: a slot is busy
    page.get_by_role("button", name="Stop").click()
    stopped_at = time.monotonic()
    while not idle_slots(ui_server):
        assert time.monotonic() - stopped_at < 1.0, "the slot was still busy 1 s after Stop"
        time.sleep(0.05)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.locator("#messages .msg.assistant .note").last).to_have_text("Stopped.")
    text = last_answer(page)
    time.sleep(1.0)
    assert last_answer(page) == text  # the text stopped growing


def test_escape_stops_and_shift_enter_adds_a_line(page: Page, ui_server: LiveServer) -> None:
    open_chat(page, ui_server, temperature="0", max_tokens="900")  # greedy, as above
    prompt = page.get_by_label("Message")
    prompt.fill("Count from 1 to 1000")
    prompt.press("Shift+Enter")
    prompt.press_sequentially("one number per line.")
    assert prompt.input_value() == "Count from 1 to 1000\none number per line."
    prompt.press("Enter")
    expect(page.get_by_role("button", name="Stop")).to_be_enabled()
    page.wait_for_function(
        "() => { const a = document.querySelectorAll('#messages .msg.assistant .content');"
        " return a.length && a[a.length - 1].textContent.length > 10; }",
        timeout=GENERATION_MS,
    )
    page.keyboard.press("Escape")
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=2_000)
    expect(page.locator("#messages .msg.assistant .note").last).to_have_text("Stopped.")


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-keyed") / "keys.json"


@pytest.fixture(scope="module")
def inference_key(keys_file: Path) -> str:
    """A named key with only the `inference` scope (read by the server when it starts)."""
    return make_key(keys_file, "alice", "inference")


@pytest.fixture(scope="module")
def limited_key(keys_file: Path) -> str:
    """A key with 200 tokens a minute: one answer of 150 tokens fits, a second does not."""
    return make_key(keys_file, "bob", "inference", tpm=200)


@pytest.fixture(scope="module")
def small_keyed_server(
    keys_file: Path, inference_key: str, limited_key: str, ui_cache_home: CacheHome
) -> Iterator[LiveServer]:
    """One slot of 256 tokens, --api-key's (admin) key and an inference-only named key: for the context meter
    and the key prompt."""
    tmp = keys_file.parent
    server = serve(tmp, ui_cache_home, "--api-key", KEY, "--keys-file", str(keys_file), parallel=1, ctx_per_slot=256)
    yield server
    stop_server(server)


def enter_key(page: Page, server: LiveServer, key: str) -> None:
    page.goto(server.base_url + "/ui/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use key").click()


def test_a_wrong_key_is_refused_and_the_right_one_works(page: Page, small_keyed_server: LiveServer) -> None:
    enter_key(page, small_keyed_server, "not-the-key")
    expect(page.get_by_role("alert").filter(has_text="not accepted")).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_be_hidden()
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(page.get_by_label("Model")).to_have_value("smollm2-135m-instruct")
    assert page.evaluate("sessionStorage.getItem('qwen3-local.key')") == KEY
    assert page.evaluate("localStorage.getItem('qwen3-local.key')") is None
    expect(page.get_by_role("tab", name="Dashboard")).to_be_visible()  # --api-key's key is an admin key
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Message").fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=GENERATION_MS)
    assert last_answer(page).strip()
    page.get_by_role("button", name="Regenerate").click()  # the answer is asked again, in its place
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=GENERATION_MS)
    expect(page.locator("#messages .msg")).to_have_count(2)
    assert last_answer(page).strip()
    # a reload in the same tab keeps the key; no prompt
    page.reload()
    expect(page.get_by_label("Model")).to_have_value("smollm2-135m-instruct")
    page.get_by_role("button", name="Change key").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('qwen3-local.key')") is None


def test_an_inference_key_sees_no_admin_tabs(page: Page, small_keyed_server: LiveServer, inference_key: str) -> None:
    enter_key(page, small_keyed_server, inference_key)
    expect(page.get_by_label("Model")).to_have_value("smollm2-135m-instruct")
    expect(page.get_by_text("alice")).to_be_visible()
    expect(page.get_by_role("tab", name="Chat")).to_be_visible()
    expect(page.get_by_role("tab", name="Dashboard")).to_be_hidden()
    expect(page.get_by_role("tab", name="Placement")).to_be_hidden()


def meter_value(page: Page) -> float:
    return float(page.locator("#context-meter").evaluate("m => m.value"))


def test_context_meter_rises_and_warns_past_three_quarters(page: Page, small_keyed_server: LiveServer) -> None:
    enter_key(page, small_keyed_server, KEY)
    expect(page.locator("#context-text")).to_contain_text("/ 256 tokens")
    empty = meter_value(page)
    expect(page.locator("#context-warning")).to_be_hidden()
    page.get_by_label("Max tokens").fill("40")
    page.get_by_label("Message").fill("Tell me about the sea.")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=GENERATION_MS)
    page.wait_for_function(f"() => document.getElementById('context-meter').value > {empty + 0.05}")
    after_one_turn = meter_value(page)
    expect(page.locator("#context-warning")).to_be_hidden()
    page.get_by_label("Message").fill("the sea is blue and wide " * 30)  # the draft counts too
    expect(page.locator("#context-warning")).to_be_visible()
    assert meter_value(page) > max(0.75, after_one_turn)


def test_a_rate_limited_request_says_so_and_waits_to_retry(
    page: Page, small_keyed_server: LiveServer, limited_key: str
) -> None:
    enter_key(page, small_keyed_server, limited_key)
    page.get_by_label("Max tokens").fill("150")
    page.get_by_label("Message").fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=GENERATION_MS)
    expect(page.locator("#chat-error")).to_be_empty()
    page.get_by_label("Message").fill("Hi again")
    page.get_by_role("button", name="Send").click()
    error = page.locator("#chat-error")
    expect(error).to_contain_text("Too many requests (429)")
    expect(error).to_contain_text(re.compile(r"Retrying in \d+ s"))
    expect(page.get_by_role("button", name="Stop")).to_be_enabled()  # waiting to retry: Stop gives up
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def sse(*chunks: dict[str, object]) -> str:
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def test_reasoning_is_folded_and_tool_calls_are_shown(page: Page, ui_server: LiveServer) -> None:
    """SmolLM2 neither thinks nor calls tools unasked: this one answer is the server's stream format, played
    by the browser's network layer (the page, the models list and /tokenize are the live server's)."""

    def delta(**fields: object) -> dict[str, object]:
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields, "finish_reason": None}]}

    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    body = sse(
        delta(role="assistant", reasoning_content="The user wants "),
        delta(reasoning_content="the weather in Paris."),
        delta(tool_calls=[call]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]),
    )
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body),
    )
    open_chat(page, ui_server)
    page.get_by_label("Message").fill("Weather in Paris?")
    page.get_by_role("button", name="Send").click()
    answer = page.locator("#messages .msg.assistant").last
    expect(answer.locator(".tool-call")).to_have_text('Tool call: get_weather({"city": "Paris"})')
    reasoning = answer.locator("details.reasoning")
    expect(reasoning).not_to_have_attribute("open", "")
    expect(reasoning.locator(".reasoning-text")).to_be_hidden()  # folded
    reasoning.locator("summary").click()
    expect(reasoning.locator(".reasoning-text")).to_have_text("The user wants the weather in Paris.")
