"""The FastAPI app: routes, the one error mapping, metrics, and the model's lifecycle.

The model loads (and, on first use, downloads) in a background thread, so the server answers from the first
second: /health says 503 "downloading" with the bytes done, then "loading", until the engine runs, then 200.
Everything the app holds hangs off `app.state.server`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from registry.models import RegistryError, load_registry
from server.api import admin, embeddings, openai
from server.api import ui as ui_api
from server.api.auth import RateLimitHeaders
from server.api.errors import CatchUnexpectedErrors, document_openai_errors, install_error_handlers
from server.api.state import ServerState, app_server_state
from server.audit.capture import AuditMiddleware
from server.auth.snapshot import Auth
from server.chat_template import ChatTemplateError, select_chat_template
from server.engine.engine import Engine
from server.metrics import CountRequests
from server.settings import Settings
from server.ui import mount_ui

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Engine]


def served_model_id(settings: Settings) -> str:
    """The id clients send as `model`: the configured name, else the models.yaml name or the file's stem."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model is None:
        return load_registry(settings.models_file).default
    path = Path(settings.model).expanduser()
    if settings.model.endswith(".gguf") or path.is_file():
        return path.stem
    return settings.model


def model_sampling_defaults(settings: Settings) -> dict[str, float]:
    """The served model's models.yaml sampling defaults; none for a GGUF path (it has no registry entry)."""
    if settings.model is not None:
        path = Path(settings.model).expanduser()
        if settings.model.endswith(".gguf") or path.is_file():
            return {}
    try:
        registry = load_registry(settings.models_file)
        entry = registry.entry(settings.model or registry.default)
    except RegistryError as exc:
        # The loader reads the registry again and reports this same error as the load's failure (503 and
        # /health say why); the app itself must still come up to say it.
        log.debug("no sampling defaults: %s", exc)
        return {}
    return entry.sampling.given()


def _build_engine(settings: Settings, state: ServerState) -> Engine:
    from server.boot.loader import build_engine  # deferred: it imports llama.cpp, which loads slowly

    return build_engine(settings, observer=state)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> bool:
    """Run callback on the event loop thread; False when the loop is already closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


def _load_model(state: ServerState, factory: EngineFactory, loop: asyncio.AbstractEventLoop) -> None:
    """The loader thread: build the engine and pick its chat template, then hand both to the event loop."""
    try:
        engine = factory()
    except RegistryError as exc:  # a download or lookup that failed: its message says it all, no traceback
        log.error("loading the model failed: %s", exc)
        _on_loop(loop, state.fail, f"{type(exc).__name__}: {exc}")
        return
    except Exception as exc:  # anything else llama.cpp or the planner raised: the server reports it, not dies
        log.exception("loading the model failed")
        _on_loop(loop, state.fail, f"{type(exc).__name__}: {exc}")
        return
    override = Path(state.settings.chat_template) if state.settings.chat_template else None
    try:
        template = select_chat_template(engine.info, engine.vocab, override)
    except ChatTemplateError as exc:
        log.error("%s", exc)
        engine.stop()
        _on_loop(loop, state.fail, str(exc))
        return
    if not _on_loop(loop, state.attach, engine, template):
        engine.stop()


@asynccontextmanager
async def _lifespan(app: FastAPI, *, factory: EngineFactory) -> AsyncIterator[None]:
    state = app_server_state(app)
    log.info("loading model %s", state.served_model_id)
    loader = threading.Thread(
        target=_load_model, args=(state, factory, asyncio.get_running_loop()), name="model-loader", daemon=True
    )
    loader.start()
    if state.audit is not None:
        state.audit.start()
    stop_reloading_auth = app.state.auth.reload_on_sighup()  # keys and limits reload on SIGHUP
    try:
        yield
    finally:
        stop_reloading_auth()
        engine = state.detach()
        if engine is not None:
            # stop() joins the engine thread, whose last act fails every unfinished request: not on the loop
            await asyncio.to_thread(engine.stop)
        if state.audit is not None:  # after the engine: the requests it failed are recorded too
            await asyncio.to_thread(state.audit.stop)


def create_app(
    settings: Settings,
    *,
    engine_factory: EngineFactory | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app for these settings. `engine_factory` builds the engine (in a background thread); by default
    it loads the configured model through llama.cpp. A failed load leaves the app answering 503 (and
    /health says why, as does `app.state.server.load_error`); `on_load_failure(message)`, called on the event
    loop, lets the CLI stop the server instead."""
    state = ServerState(settings, served_model_id(settings), on_load_failure, model_sampling_defaults(settings))
    factory = engine_factory or partial(_build_engine, settings, state)
    app = FastAPI(
        title="qwen3-local",
        summary="OpenAI-compatible server for GGUF models with continuous batching",
        lifespan=partial(_lifespan, factory=factory),
    )
    app.state.server = state
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
