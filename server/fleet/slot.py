"""One served model's lifecycle: unloaded → loading → ready (or failed) → unloading → unloaded; stopped at shutdown.

Mutated only on the event loop thread (the loader thread hands its result over with call_soon_threadsafe), except
a download's progress, which the loader thread reports many times a second: it sits behind a lock of its own.
`settled` is set whenever the slot is not in a transition, so requests waiting for a load can await it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Literal

from offload.planner import Plan
from server.chat_template import ChatTemplate
from server.engine.engine import Engine, EngineStats
from server.errors import ServiceUnavailableError
from server.fleet.spec import ModelSpec

log = logging.getLogger(__name__)

SlotStatus = Literal["unloaded", "loading", "ready", "failed", "unloading", "stopped"]
# /v1/models' `state`
PUBLIC_STATE = {"ready": "loaded", "loading": "loading", "unloading": "loaded"}


class ModelSlot:
    def __init__(self, spec: ModelSpec, status: SlotStatus = "unloaded") -> None:
        self.spec = spec
        self.status: SlotStatus = status
        self.load_error: str | None = None
        self.engine: Engine | None = None
        self.chat_template: ChatTemplate | None = None
        self.created = int(time.time())
        self.startup_load = status == "loading"  # a preload: requests get 503 "loading", as one model always did
        self.in_flight = 0  # requests holding a lease
        self.last_used = 0.0  # the fleet's clock when the last lease ended (or the load finished)
        self.keep_alive_s = spec.keep_alive_s  # the last request's keep_alive, else the model's
        # Its share of the joint memory plan (several models with --auto-offload), set by the fleet before each
        # load: the loader places the model with it; None: the loader plans the model alone
        self.planned: Plan | None = None
        self.settled = asyncio.Event()
        if status not in ("loading", "unloading"):
            self.settled.set()
        self._download_lock = threading.Lock()
        self._download: tuple[int, int] | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def public_state(self) -> str:
        return PUBLIC_STATE.get(self.status, "unloaded")

    # --- the loader thread ----------------------------------------------------------------------------
    def downloading(self, bytes_done: int, bytes_total: int) -> None:
        with self._download_lock:
            self._download = (bytes_done, bytes_total)

    def downloaded(self) -> None:
        with self._download_lock:
            self._download = None

    def download_progress(self) -> tuple[int, int] | None:
        if self.status != "loading":
            return None
        with self._download_lock:
            return self._download

    # --- the event loop -------------------------------------------------------------------------------
    def begin_loading(self, *, startup: bool) -> None:
        self.status, self.load_error, self.startup_load = "loading", None, startup
        self.settled.clear()

    def attach(self, engine: Engine, chat_template: ChatTemplate, now: float) -> bool:
        """The loader finished: start the engine (on the event loop: it captures the loop) and serve. False when
        the engine must be stopped instead (shut down while loading, or it failed to start)."""
        if self.status == "stopped":
            return False
        try:
            engine.start()
        except Exception as exc:
            log.exception("the engine of %s failed to start", self.id)
            self.fail(f"the engine failed to start: {exc}")
            return False
        self.engine, self.chat_template, self.status = engine, chat_template, "ready"
        self.last_used = now
        self.settled.set()
        info = engine.info
        log.info(
            "serving %s (%s): %d slots × %d tokens, chat template from %s",
            self.id,
            info.architecture,
            info.n_slots,
            info.n_ctx_per_slot,
            chat_template.origin,
        )
        return True

    def fail(self, message: str) -> None:
        if self.status != "stopped":
            self.status, self.load_error = "failed", message
        self.settled.set()

    def begin_unloading(self) -> Engine | None:
        """No more requests; the caller stops the returned engine (off the loop), then calls unloaded()."""
        engine, self.engine, self.chat_template = self.engine, None, None
        self.status = "unloading"
        self.settled.clear()
        return engine

    def unloaded(self) -> None:
        if self.status == "unloading":
            self.status = "unloaded"
        self.keep_alive_s = self.spec.keep_alive_s
        self.settled.set()

    def stop(self) -> Engine | None:
        """Shutdown: no more requests; the caller stops the returned engine."""
        engine, self.engine = self.engine, None
        self.status = "stopped"
        self.settled.set()
        return engine

    # --- what the routes read -------------------------------------------------------------------------
    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None and self.status == "ready" else None

    def ready(self) -> tuple[Engine, ChatTemplate]:
        if self.status == "ready" and self.engine is not None and self.chat_template is not None:
            return self.engine, self.chat_template
        raise ServiceUnavailableError(self.unavailable_reason())

    def context_length(self) -> int | None:
        """A slot's context: the engine's when loaded, else the configured one (None: decided at load)."""
        if self.engine is not None:
            return self.engine.info.n_ctx_per_slot
        return self.spec.settings.ctx_size

    def unavailable_reason(self) -> str:
        if (progress := self.download_progress()) is not None:
            return f"The model is still downloading ({progress[0]} of {progress[1]} bytes); retry later."
        if self.status == "loading":
            return "The model is still loading; retry shortly."
        if self.status == "failed":
            return f"The model failed to load: {self.load_error}"
        if self.status in ("unloaded", "unloading"):
            return f"The model {self.id} is not loaded."
        return "The server is shutting down."
