"""Everything one app holds at run time, hung off `app.state.server` (no module-level mutable state)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal, cast

from fastapi import FastAPI
from starlette.requests import HTTPConnection

from server.audit.writer import AuditWriter, writer_for
from server.chat_template import ChatTemplate
from server.engine.engine import Engine, EngineStats
from server.errors import ModelNotFoundError, ServiceUnavailableError
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

LoadStatus = Literal["loading", "ready", "failed", "stopped"]


class ServerState:
    """The model's lifecycle (loading → ready, or failed) and what the routes need from it.

    Mutated only on the event loop thread: the loader thread hands its result over with
    call_soon_threadsafe. The one exception is a download's progress, which the loader thread reports
    many times a second while the status stays "loading": it sits behind a lock of its own.
    """

    def __init__(
        self,
        settings: Settings,
        served_model_id: str,
        on_load_failure: Callable[[str], None] | None = None,
        sampling_defaults: Mapping[str, float] | None = None,
    ) -> None:
        self.settings = settings
        # The model's models.yaml sampling: read once, before loading; never changes while serving.
        self.sampling_defaults: Mapping[str, float] = MappingProxyType(dict(sampling_defaults or {}))
        self._on_load_failure = on_load_failure
        self.served_model_id = served_model_id
        self.created = int(time.time())
        self.status: LoadStatus = "loading"
        self.load_error: str | None = None
        self.engine: Engine | None = None
        self.chat_template: ChatTemplate | None = None
        self.audit: AuditWriter | None = writer_for(settings)  # None: auditing is off
        self.metrics = Metrics(self.engine_stats, served_model_id, self.load_report, read_audit_spool=self._audit_spool)
        self._download_lock = threading.Lock()
        self._download: tuple[int, int] | None = None

    def downloading(self, bytes_done: int, bytes_total: int) -> None:
        """The loader thread: the model is downloading, this far (bytes over every file)."""
        with self._download_lock:
            self._download = (bytes_done, bytes_total)

    def downloaded(self) -> None:
        """The loader thread: the download is over (verified); loading goes on."""
        with self._download_lock:
            self._download = None

    def download_progress(self) -> tuple[int, int] | None:
        """(bytes_done, bytes_total) while the model downloads; None otherwise."""
        if self.status != "loading":
            return None
        with self._download_lock:
            return self._download

    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None and self.status == "ready" else None

    def _audit_spool(self) -> tuple[int, int] | None:
        """The audit spool's (bytes now, capacity) for the metrics; None when auditing is off."""
        return None if self.audit is None else (self.audit.spool_bytes(), self.audit.spool_max_bytes)

    def load_report(self) -> Mapping[str, Any] | None:
        """GET /plan's data (the metrics show its placement); None until the model serves."""
        return self.engine.load_report if self.engine is not None else None

    def attach(self, engine: Engine, chat_template: ChatTemplate) -> None:
        """The loader finished: start the engine (on the event loop: it captures the loop) and serve."""
        if self.status == "stopped":  # shut down while loading: nobody will use this engine
            engine.stop()
            return
        try:
            engine.start()
        except Exception as exc:
            log.exception("the engine failed to start")
            self.fail(f"the engine failed to start: {exc}")
            engine.stop()
            return
        self.engine = engine
        self.chat_template = chat_template
        self.status = "ready"
        info = engine.info
        log.info(
            "serving %s (%s): %d slots × %d tokens, chat template from %s",
            self.served_model_id,
            info.architecture,
            info.n_slots,
            info.n_ctx_per_slot,
            chat_template.origin,
        )

    def fail(self, message: str) -> None:
        if self.status == "stopped":
            return
        self.status = "failed"
        self.load_error = message
        if self._on_load_failure is not None:
            self._on_load_failure(message)

    def detach(self) -> Engine | None:
        """Shutdown: no more requests; the caller stops the returned engine."""
        engine, self.engine = self.engine, None
        self.status = "stopped"
        return engine

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.served_model_id:
            raise ModelNotFoundError(
                f"The model '{requested}' does not exist; this server serves '{self.served_model_id}'.",
                param="model",
            )

    def ready(self) -> tuple[Engine, ChatTemplate]:
        if self.status == "ready" and self.engine is not None and self.chat_template is not None:
            return self.engine, self.chat_template
        raise ServiceUnavailableError(self.unavailable_reason())

    def unavailable_reason(self) -> str:
        if (progress := self.download_progress()) is not None:
            return f"The model is still downloading ({progress[0]} of {progress[1]} bytes); retry later."
        if self.status == "loading":
            return "The model is still loading; retry shortly."
        if self.status == "failed":
            return f"The model failed to load: {self.load_error}"
        return "The server is shutting down."


def server_state(connection: HTTPConnection) -> ServerState:
    return cast(ServerState, connection.app.state.server)


def app_server_state(app: FastAPI) -> ServerState:
    return cast(ServerState, app.state.server)
