"""Fault injection with the deterministic fake backend, in-process: one llama_decode failing while several
requests run (only that batch's requests may fail; the rest, finished before, queued behind or sent after,
must give exactly their solo answers), a streaming client that stops reading altogether, and one that leaves
while the answer's headers are being sent."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.api import sse
from server.engine.engine import EngineConfig
from server.engine.fake_backend import FakeBackendConfig

from .helpers import MODEL, Served, assert_openai_error, post_scope, raw_post, serve, sse_payloads, wait_for

pytestmark = pytest.mark.anyio

# "é" is UTF-8 0xC3 0xA9: the fake tokenizes text byte by byte and its model gives every byte >= 0x80 a
# logit of -30, so 0xC3 reaches a decode only inside this prompt, never as a generated token.
POISON_TOKEN = 0xC3
POISON_PROMPT = "Say café."


def body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def streamed_text(payloads: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for payload in payloads
        if isinstance(payload, dict) and "choices" in payload
        for choice in payload["choices"]
    )


async def answer(served: Served, prompt: str, max_tokens: int) -> str:
    response = await served.client.post("/v1/chat/completions", json=body(prompt, max_tokens, stream=False))
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def assert_complete_stream(response: httpx.Response, solo: str) -> None:
    assert response.status_code == 200, response.text
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    assert not any(isinstance(p, dict) and "error" in p for p in payloads), payloads
    assert streamed_text(payloads) == solo


async def test_failed_decode_mid_step_fails_only_the_requests_in_that_batch() -> None:
    backend = FakeBackendConfig(n_slots=4, n_ctx_per_slot=512, step_delay_s=0.003, fail_on_token=POISON_TOKEN)
    async with serve(backend, EngineConfig(max_queue=8)) as served:
        victims = {"b": "Tell me about boats.", "c": "Tell me about cats.", "d": "Tell me about dogs."}
        bystanders = {"e": "Name an emu.", "f": "Name a fox."}
        short_prompt = "Tell me about ants."
        solo = {key: await answer(served, prompt, 200) for key, prompt in victims.items()}
        solo |= {key: await answer(served, prompt, 30) for key, prompt in bystanders.items()}
        solo["a"] = await answer(served, short_prompt, 20)
        post = served.client.post

        # Four requests fill the four slots: "a" ends after 20 tokens, the others want 200.
        running = {
            "a": asyncio.create_task(post("/v1/chat/completions", json=body(short_prompt, 20, stream=True))),
            "b": asyncio.create_task(post("/v1/chat/completions", json=body(victims["b"], 200, stream=True))),
            "c": asyncio.create_task(post("/v1/chat/completions", json=body(victims["c"], 200, stream=False))),
            "d": asyncio.create_task(post("/v1/chat/completions", json=body(victims["d"], 200, stream=True))),
        }
        await wait_for(lambda: served.engine.stats().n_slots_busy == 4)
        # The poisoned request waits for "a"'s slot; "e" and "f" queue behind it (admission is in arrival
        # order). When "a" finishes, one step decodes b, c, d and the poisoned prefill together: it fails.
        poisoned = asyncio.create_task(post("/v1/chat/completions", json=body(POISON_PROMPT, 10, stream=False)))
        await wait_for(lambda: served.engine.stats().n_requests_waiting >= 1 or poisoned.done())
        queued = {
            "e": asyncio.create_task(post("/v1/chat/completions", json=body(bystanders["e"], 30, stream=True))),
            "f": asyncio.create_task(post("/v1/chat/completions", json=body(bystanders["f"], 30, stream=False))),
        }

        assert_openai_error(await poisoned, 500, code="decode_failed")
        for key in ("b", "d"):  # streams that had started: an error event after their correct first tokens
            response = await running[key]
            assert response.status_code == 200
            payloads = sse_payloads(response.text)
            assert payloads[-1] == "[DONE]"
            error = payloads[-2]["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "decode_failed"
            partial = streamed_text(payloads)
            assert partial and solo[key].startswith(partial) and len(partial) < len(solo[key])
        assert_openai_error(await running["c"], 500, code="decode_failed")  # not streamed: one JSON error

        assert_complete_stream(await running["a"], solo["a"])  # finished before the failing step
        assert_complete_stream(await queued["e"], solo["e"])  # admitted after it
        response = await queued["f"]
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == solo["f"]

        stats = served.engine.stats()
        assert stats.n_decode_errors == 1
        assert stats.n_requests_failed == 4  # b, c, d and the poisoned one: nobody else
        assert (await served.client.get("/health")).status_code == 200
        assert all(slot["state"] == "idle" for slot in (await served.client.get("/slots")).json())
        assert await answer(served, victims["c"], 200) == solo["c"]  # a failed slot's next user is unharmed
        assert served.backend.n_live_samplers() == 0


async def stuck_reader(app: FastAPI, payload: dict[str, Any], n_sends: int) -> tuple[asyncio.Task[None], list[bytes]]:
    """Drive one request through ASGI with a `send` that never returns after n_sends messages: what a
    client that stopped reading looks like to the app once uvicorn's flow control holds its writes."""
    body = json.dumps(payload).encode()
    scope = post_scope("/v1/chat/completions", body)
    received: list[bytes] = []
    body_sent = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client neither sends nor hangs up
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        if len(received) >= n_sends:
            await never.wait()
        received.append(bytes(message.get("body", b"")))

    return asyncio.create_task(app(scope, receive, send)), received


async def test_a_stream_whose_client_stops_reading_is_closed_and_frees_its_slot(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sse, "SEND_TIMEOUT_S", 0.3)
    # 400 tokens take at least 4 s here: a request only stops far short of that if it was cancelled.
    backend = FakeBackendConfig(n_slots=2, n_ctx_per_slot=512, step_delay_s=0.01)
    async with serve(backend) as served:
        solo = await answer(served, "Name a fox.", 30)
        n_generated_before = served.engine.stats().n_generated_tokens
        stuck, received = await stuck_reader(served.app, body("Tell me a long story.", 400, stream=True), n_sends=4)
        other = asyncio.create_task(
            served.client.post("/v1/chat/completions", json=body("Name a fox.", 30, stream=True))
        )
        with caplog.at_level(logging.WARNING, logger="server.api.sse"):
            await asyncio.wait_for(stuck, timeout=15)  # without a send timeout it would wait forever
        assert b"data: " in b"".join(received)  # it had started streaming before it got stuck
        assert "accepted no data" in caplog.text
        assert_complete_stream(await other, solo)  # the reader next to it was not held up
        await wait_for(lambda: served.engine.stats().n_slots_busy == 0)
        n_stuck_tokens = served.engine.stats().n_generated_tokens - n_generated_before - 30  # less `other`'s 30
        assert 0 < n_stuck_tokens < 200  # cancelled long before its 400 tokens
        assert served.backend.n_live_samplers() == 0
        assert (await served.client.get("/health")).status_code == 200
        assert await answer(served, "Name a fox.", 30) == solo


async def test_a_stream_whose_client_leaves_before_its_body_starts_releases_the_model_on_the_event_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client hangs up while the answer's headers are still being sent: the SSE body never starts, so only
    the response's background task can end the request's hold on its model. It must run on the event loop (the
    fleet's state is the loop's): with keep_alive 0 the model is then unloaded, as after any other answer."""
    async with serve(FakeBackendConfig(n_slots=2, n_ctx_per_slot=512)) as served:
        payload = body("Name a fox.", 30, stream=True) | {"keep_alive": 0}

        async def headers_then_gone(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                exchange.disconnected.set()  # the client hangs up while this send still waits on a slow socket
                await asyncio.sleep(10)

        with caplog.at_level(logging.WARNING):
            exchange = await raw_post(served.app, "/v1/chat/completions", payload, before_send=headers_then_gone)
            await asyncio.wait_for(exchange.task, timeout=10)
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text
        slot = served.state.fleet.default
        await wait_for(lambda: slot.status == "unloaded", timeout_s=5)
        assert slot.in_flight == 0
