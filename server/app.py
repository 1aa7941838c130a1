"""The FastAPI app: routes, the one error mapping, metrics, and the served models' lifecycle (server/fleet).

Models load (and, on first use, download) in background threads, so the server answers from the first second:
/health says 503 "downloading" with the bytes done, then "loading", until an engine runs, then 200. Models not
preloaded load on their first request. Everything the app holds hangs off `app.state.server`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import admin, embeddings, openai
from server.api import ui as ui_api
from server.api.auth import RateLimitHeaders
from server.api.errors import CatchUnexpectedErrors, document_openai_errors, install_error_handlers
from server.api.state import ServerState, app_server_state
from server.audit.capture import AuditMiddleware
from server.auth.snapshot import Auth
from server.engine.core_share import CoreShare
from server.engine.engine import Engine
from server.fleet.admission import MIB, Admission, JointAdmission, MemoryBudget, default_budget_bytes
from server.fleet.fleet import EngineBuilder
from server.fleet.slot import ModelSlot
from server.fleet.spec import ModelSpec, model_specs
from server.metrics import CountRequests
from server.rpc.failover import RpcFailover, app_failover
from server.settings import Settings, physical_cores
from server.ui import mount_ui

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]


def served_model_id(settings: Settings) -> str:
    """The id clients send as `model` for the default (first) model."""
    return model_specs(settings)[0].id


def _llama_builder(core_share: CoreShare) -> EngineBuilder:
    """Builds each model's engine through llama.cpp; the models that split the cores share `core_share`."""

    def build(spec: ModelSpec, slot: ModelSlot) -> Engine:
        from server.boot.loader import build_engine  # deferred: it imports llama.cpp, which loads slowly

        share = core_share if spec.shares_cores else None
        return build_engine(spec.settings, observer=slot, planned=slot.planned, core_share=share)

    return build


def _default_admission(settings: Settings, specs: list[ModelSpec]) -> Admission:
    """--memory-budget-mib: predicted bytes against it. Else with --auto-offload (on any model) and several
    models: offload/joint.py's one plan for all loaded models; else predicted bytes against RAM (+ GPU)."""
    if settings.memory_budget_mib is not None:
        return MemoryBudget(settings.memory_budget_mib * MIB)
    budget = MemoryBudget(default_budget_bytes())
    if len(specs) > 1 and any(spec.settings.auto_offload for spec in specs):
        from bindings.devices import list_devices  # deferred: it imports llama.cpp, which loads slowly
        from bindings.llama_backend import supports_gpu_offload
        from offload.hardware import detect

        with_gpus = supports_gpu_offload()
        hardware = detect(
            cache_path=settings.cache_dir / "hardware.json",
            with_gpus=with_gpus,
            backend_devices=list_devices() if with_gpus else None,
        )
        return JointAdmission(hardware, budget)
    return budget


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app_server_state(app)
    failover = app_failover(app)
    if failover is not None:  # before any model loads: a lost RPC worker fails requests instead of the process
        failover.start(asyncio.get_running_loop())
    state.fleet.start(asyncio.get_running_loop())
    if state.audit is not None:
        state.audit.start()
    stop_reloading_auth = app.state.auth.reload_on_sighup()  # keys and limits reload on SIGHUP
    try:
        yield
    finally:
        if failover is not None:
            failover.stop()
        stop_reloading_auth()
        await state.fleet.stop()
        if state.audit is not None:  # after the engines: the requests they failed are recorded too
            await asyncio.to_thread(state.audit.stop)


def create_app(
    settings: Settings,
    *,
    engine_factory: EngineFactory | None = None,
    on_load_failure: Callable[[str], None] | None = None,
    engine_builder: EngineBuilder | None = None,
    admission: Admission | None = None,
    clock: Callable[[], float] | None = None,
) -> FastAPI:
    """The app for these settings: every served model (server/fleet/spec.py) routable by id and alias. Models
    load in background threads: by default through llama.cpp; `engine_builder(spec, slot)` builds any model's
    engine instead, and `engine_factory()` the default model's (a one-model server's, as tests give it). A failed
    preload of the default model leaves the app answering 503 (and /health says why, as does
    `app.state.server.load_error`); `on_load_failure(message)`, called on the event loop, lets the CLI stop the
    server instead. `admission` decides what fits in memory; `clock` (tests) times keep_alive."""
    specs = model_specs(settings)
    builder = engine_builder or _llama_builder(CoreShare(physical_cores()))  # the cores the served models split
    if engine_factory is not None:
        factory = engine_factory
        builder = _default_from(factory, specs[0].id, builder)
    state = ServerState(
        settings, specs, builder, admission or _default_admission(settings, specs), on_load_failure, clock=clock
    )
    app = FastAPI(
        title="qwen3-local",
        summary="OpenAI-compatible server for GGUF models with continuous batching",
        lifespan=_lifespan,
    )
    app.state.server = state
    app.state.rpc_failover = RpcFailover.of_state(state)  # a lost RPC worker: 503s, /health, reload (server/rpc)
    app.state.auth = Auth(settings)  # who may call (server/auth): keys, JWT, rate limits
    install_error_handlers(app)
    document_openai_errors(app)
    app.add_middleware(CatchUnexpectedErrors)
    app.add_middleware(RateLimitHeaders)  # x-ratelimit-* on every answer, errors included
    app.add_middleware(CountRequests, metrics=state.metrics)  # added last: outermost, sees every status
    app.add_middleware(  # outermost of all: every answer gets its x-request-id, every request one audit record
        AuditMiddleware,
        writer=lambda: state.audit,
        content=settings.audit_content,
        required=settings.effective_audit_required(),
    )
    app.include_router(admin.health_router)
    app.include_router(admin.router)
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(ui_api.router)  # /ui/api/*: before the /ui static mount, which would shadow it
    mount_ui(app)  # the web UI's static files at /ui: keep last, after every /ui/api route
    return app


def _default_from(factory: EngineFactory, default_id: str, others: EngineBuilder) -> EngineBuilder:
    """A builder that loads the default model with `factory` and every other model with `others`."""

    def build(spec: ModelSpec, slot: ModelSlot) -> Engine:
        return factory() if spec.id == default_id else others(spec, slot)

    return build
