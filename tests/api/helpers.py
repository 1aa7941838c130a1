"""Helpers for the API tests: the app in-process over a FakeBackend engine, reached by an httpx client on
ASGITransport, with the app's lifespan running (the engine thread, the loader thread and shutdown are the
real ones)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from server.api.state import ServerState, app_server_state
from server.app import create_app
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.settings import Settings

MODEL = "fake-model"


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient
    backend: FakeBackend
    engine: Engine

    @property
    def state(self) -> ServerState:
        return app_server_state(self.app)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll until condition() holds; fail the test if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def serve(
    backend_config: FakeBackendConfig | None = None,
    engine_config: EngineConfig | None = None,
    **settings: Any,
) -> AsyncIterator[Served]:
    backend = FakeBackend(backend_config or FakeBackendConfig())
    engine = Engine(backend, engine_config or EngineConfig())
    app = create_app(Settings(served_model_name=MODEL, **settings), engine_factory=lambda: engine)
    async with app.router.lifespan_context(app):
        await wait_for(lambda: app_server_state(app).status != "loading")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Served(app, client, backend, engine)


def sse_payloads(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final '[DONE]'."""
    payloads: list[Any] = []
    for block in body.split("\n\n"):
        data = [line[len("data: ") :] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            text = "\n".join(data)
            payloads.append(text if text == "[DONE]" else json.loads(text))
    return payloads


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@dataclass
class RawExchange:
    """One request driven straight through the ASGI interface, so a test can read part of a streamed
    response and then disconnect (httpx's ASGITransport buffers whole responses and never disconnects)."""

    task: asyncio.Task[None]
    sent: asyncio.Queue[dict[str, Any]]
    disconnected: asyncio.Event

    async def status(self) -> int:
        message = await asyncio.wait_for(self.sent.get(), timeout=10)
        assert message["type"] == "http.response.start"
        return int(message["status"])

    async def next_body(self) -> bytes:
        while True:
            message = await asyncio.wait_for(self.sent.get(), timeout=10)
            if message["type"] == "http.response.body" and message.get("body"):
                return bytes(message["body"])

    async def disconnect(self) -> None:
        self.disconnected.set()
        await asyncio.wait_for(self.task, timeout=10)


def post_scope(path: str, body: bytes) -> dict[str, Any]:
    """The ASGI scope of a JSON POST from a client on 127.0.0.1."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def raw_post(
    app: FastAPI,
    path: str,
    payload: dict[str, Any],
    *,
    before_send: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> RawExchange:
    """`before_send`: awaited with each message the app sends before it is recorded (a slow socket)."""
    body = json.dumps(payload).encode()
    scope = post_scope(path, body)
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal body_delivered
        if not body_delivered:
            body_delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if before_send is not None:
            await before_send(message)
        await sent.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    return RawExchange(task, sent, disconnected)
