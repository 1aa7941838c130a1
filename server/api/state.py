"""Everything one app holds at run time, hung off `app.state.server` (no module-level mutable state).

The served models live in a Fleet (server/fleet): one slot per model, each with its own engine once loaded. The
single-model attributes (`status`, `engine`, `chat_template`, `served_model_id`, `ready()`, ...) are the default
model's, so a server of one model reads exactly as it always did."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

from fastapi import FastAPI
from starlette.requests import HTTPConnection

from server.audit.writer import AuditWriter, writer_for
from server.chat_template import ChatTemplate
from server.engine.engine import Engine, EngineStats
from server.fleet.admission import Admission
from server.fleet.fleet import NO_KEEP_ALIVE, EngineBuilder, Fleet, Lease
from server.fleet.slot import ModelSlot, SlotStatus
from server.fleet.spec import ModelSpec
from server.metrics import Metrics, ModelReading
from server.settings import Settings

log = logging.getLogger(__name__)


class ServerState:
    """The served models (a Fleet), the audit writer and the metrics of one app. Mutated only on the event loop
    thread (see server/fleet/slot.py for the one exception, a download's progress)."""

    def __init__(
        self,
        settings: Settings,
        specs: Sequence[ModelSpec],
        builder: EngineBuilder,
        admission: Admission,
        on_load_failure: Callable[[str], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        extra = {"clock": clock} if clock is not None else {}
        self.fleet = Fleet(specs, builder, admission, on_startup_failure=on_load_failure, **extra)
        self.audit: AuditWriter | None = writer_for(settings)  # None: auditing is off
        many = len(specs) > 1
        self.metrics = Metrics(
            self.engine_stats,
            self.served_model_id,
            self.load_report,
            read_audit_spool=self._audit_spool,
            read_models=self.model_readings if many else None,
        )

    # --- the default model, as a one-model server always read ---------------------------------------
    @property
    def default(self) -> ModelSlot:
        return self.fleet.default

    @property
    def served_model_id(self) -> str:
        return self.fleet.default.id

    @property
    def sampling_defaults(self) -> Mapping[str, float]:
        return MappingProxyType(dict(self.fleet.default.spec.sampling_defaults))

    @property
    def created(self) -> int:
        return self.fleet.default.created

    @property
    def status(self) -> SlotStatus:
        return self.fleet.default.status

    @property
    def load_error(self) -> str | None:
        return self.fleet.default.load_error

    @property
    def engine(self) -> Engine | None:
        return self.fleet.default.engine

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self.fleet.default.chat_template

    def downloading(self, bytes_done: int, bytes_total: int) -> None:
        self.fleet.default.downloading(bytes_done, bytes_total)

    def downloaded(self) -> None:
        self.fleet.default.downloaded()

    def download_progress(self) -> tuple[int, int] | None:
        return self.fleet.default.download_progress()

    def engine_stats(self) -> EngineStats | None:
        return self.fleet.default.engine_stats()

    def load_report(self) -> Mapping[str, Any] | None:
        """GET /plan's data (the metrics show its placement); None until the model serves."""
        engine = self.fleet.default.engine
        return engine.load_report if engine is not None else None

    def ready(self) -> tuple[Engine, ChatTemplate]:
        return self.fleet.default.ready()

    def unavailable_reason(self) -> str:
        return self.fleet.default.unavailable_reason()

    def check_model(self, requested: str | None) -> None:
        self.fleet.resolve(requested)

    # --- several models -----------------------------------------------------------------------------
    def model(self, name: str | None) -> ModelSlot:
        """The slot `name` routes to (None: the default model); 404 naming the served ones."""
        return self.fleet.resolve(name)

    async def acquire(self, name: str | None, keep_alive: Any = None) -> Lease:
        """The named model, loaded (on demand), held until the lease is released."""
        return await self.fleet.acquire(name, NO_KEEP_ALIVE if keep_alive is None else keep_alive)

    def model_readings(self) -> list[ModelReading]:
        return [
            ModelReading(slot.id, slot.engine_stats(), slot.engine.load_report if slot.engine is not None else None)
            for slot in self.fleet.slots.values()
        ]

    def _audit_spool(self) -> tuple[int, int] | None:
        """The audit spool's (bytes now, capacity) for the metrics; None when auditing is off."""
        return None if self.audit is None else (self.audit.spool_bytes(), self.audit.spool_max_bytes)


def server_state(connection: HTTPConnection) -> ServerState:
    return cast(ServerState, connection.app.state.server)


def app_server_state(app: FastAPI) -> ServerState:
    return cast(ServerState, app.state.server)
