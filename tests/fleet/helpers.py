"""An app serving several fake models: each load builds a fresh FakeBackend engine (tests can gate a load), the
admission is a MemoryBudget over fixed sizes, and keep_alive runs on a clock the test moves."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI

from registry.models import ServeEntry
from server.api.state import ServerState, app_server_state
from server.app import create_app
from server.engine.engine import Engine, EngineConfig
from server.engine.fake_backend import FakeBackend, FakeBackendConfig
from server.fleet.admission import MemoryBudget
from server.fleet.slot import ModelSlot
from server.fleet.spec import ModelSpec
from server.settings import Settings
from tests.api.helpers import wait_for

HI = [{"role": "user", "content": "hi"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Builder:
    """Builds a FakeBackend engine per load and remembers each; a model in `gates` waits for its event first."""

    step_delay_s: float = 0.0
    gates: dict[str, threading.Event] = field(default_factory=dict)
    backends: dict[str, list[FakeBackend]] = field(default_factory=dict)

    def __call__(self, spec: ModelSpec, slot: ModelSlot) -> Engine:
        gate = self.gates.get(spec.id)
        if gate is not None:
            assert gate.wait(timeout=30)
        backend = FakeBackend(
            FakeBackendConfig(n_slots=spec.settings.parallel, name=spec.id, step_delay_s=self.step_delay_s)
        )
        self.backends.setdefault(spec.id, []).append(backend)
        return Engine(backend, EngineConfig())

    def latest(self, model_id: str) -> FakeBackend:
        return self.backends[model_id][-1]


@dataclass
class Fleet:
    app: FastAPI
    client: httpx.AsyncClient
    builder: Builder
    clock: FakeClock

    @property
    def state(self) -> ServerState:
        return app_server_state(self.app)

    def status(self, model_id: str) -> str:
        return self.state.fleet.slots[model_id].status

    async def chat(self, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": HI, "max_tokens": 3, **extra}
        return await self.client.post("/v1/chat/completions", json=body)


@asynccontextmanager
async def serve_fleet(
    entries: list[dict[str, Any]],
    *,
    sizes: dict[str, int] | None = None,
    budget: int = 1 << 40,
    builder: Builder | None = None,
    headers: dict[str, str] | None = None,
    wait_for_default: bool = True,
    **settings: Any,
) -> AsyncIterator[Fleet]:
    builder = builder or Builder()
    clock = FakeClock()
    sizes = sizes or {}
    admission = MemoryBudget(budget, size_of=lambda spec: sizes.get(spec.id, 1))
    app = create_app(
        Settings(serve=[ServeEntry(**entry) for entry in entries], **settings),
        engine_builder=builder,
        admission=admission,
        clock=clock,
    )
    async with app.router.lifespan_context(app):
        first = entries[0].get("id") or entries[0]["model"]
        if wait_for_default:
            await wait_for(lambda: app_server_state(app).fleet.slots[first].status != "loading")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as client:
            yield Fleet(app, client, builder, clock)
