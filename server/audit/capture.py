"""Where requests meet the audit log: an ASGI middleware that gives every request an id (the `x-request-id`
header of every answer, errors included), answers 503 while the spool is full and auditing is required, and
enqueues one record per request once its answer has been sent; the routes fill in what only they know
(model, parameters, prompt, output, usage) on the record at `request.state.audit`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.audit.record import AuditRecord, ContentMode
from server.audit.writer import AuditWriter

# Operational probes: no data passes, and a scraper every few seconds would bury the requests that matter.
UNAUDITED_PATHS = frozenset({"/health", "/metrics"})
REQUEST_ID_HEADER = b"x-request-id"
CLIENT_DISCONNECTED = "client_disconnected"
_ERROR_BODY_LIMIT = 64 * 1024  # read the error code of error answers up to this size


def request_audit(connection: HTTPConnection) -> AuditRecord | None:
    """This request's record, or None when auditing is off."""
    return getattr(connection.state, "audit", None)


def note_error(record: AuditRecord | None, exc: BaseException) -> None:
    """An error told inside a stream that had already answered 200."""
    if record is not None:
        record.error_code = str(getattr(exc, "code", None) or "internal_error")


def note_disconnect(record: AuditRecord | None) -> None:
    """The client went away before the answer was complete."""
    if record is not None:
        record.error_code = CLIENT_DISCONNECTED


def new_request_id() -> str:
    return uuid.uuid4().hex


class AuditUnavailableResponse(JSONResponse):
    def __init__(self) -> None:
        super().__init__(
            {
                "error": {
                    "message": "The audit log cannot keep up (its database is unreachable and the local spool is "
                    "full); this server does not answer unaudited. Retry later.",
                    "type": "server_error",
                    "param": None,
                    "code": "audit_unavailable",
                }
            },
            status_code=503,
            headers={"Retry-After": "5"},
        )


class AuditMiddleware:
    """Outermost middleware. `writer()` is the app's AuditWriter (None: only the request id is added)."""

    def __init__(
        self, app: ASGIApp, *, writer: Callable[[], AuditWriter | None], content: ContentMode, required: bool
    ) -> None:
        self.app = app
        self._writer = writer
        self._content = content
        self._required = required

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        writer = self._writer() if scope["path"] not in UNAUDITED_PATHS else None
        record = self._new_record(scope, request_id) if writer is not None else None
        if record is not None:
            scope.setdefault("state", {})["audit"] = record
        started = time.perf_counter()
        tracker = _ResponseTracker(send, request_id, record)
        if writer is not None and self._required and writer.refusing():
            # Nothing is served, and the spool has no room: this refusal is the one answer not recorded
            # (counting them would let a client grow the spool without bound).
            await AuditUnavailableResponse()(scope, receive, tracker.send)
            return
        try:
            await self.app(scope, receive, tracker.send)
        finally:
            if record is not None and writer is not None:
                record.latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
                record.principal = _principal_name(scope)
                tracker.finish(record)
                writer.enqueue(record)

    def _new_record(self, scope: Scope, request_id: str) -> AuditRecord:
        client = scope.get("client")
        return AuditRecord(
            request_id=request_id,
            time=datetime.now(UTC).isoformat(timespec="microseconds"),
            method=str(scope.get("method", "")),
            endpoint=str(scope["path"]),
            client=str(client[0]) if client else None,
            _content=self._content,
        )


def _principal_name(scope: Scope) -> str | None:
    principal = scope.get("state", {}).get("principal")
    name = getattr(principal, "name", None)
    return str(name) if name is not None else None


class _ResponseTracker:
    """Adds the request id to the answer's headers; notes its status, and the error code of an error answer."""

    def __init__(self, send: Send, request_id: str, record: AuditRecord | None) -> None:
        self._send = send
        self._request_id = request_id.encode()
        self._record = record
        self.status: int | None = None
        self._error_body = bytearray()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
            message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, self._request_id)]}
        elif message["type"] == "http.response.body" and self._keeps_error_body():
            self._error_body += message.get("body", b"")
        await self._send(message)

    def _keeps_error_body(self) -> bool:
        return self._record is not None and self._is_error() and len(self._error_body) < _ERROR_BODY_LIMIT

    def _is_error(self) -> bool:
        return self.status is not None and self.status >= 400

    def finish(self, record: AuditRecord) -> None:
        # No answer started: an exception escaped every handler (the server answers 500) or the client left.
        record.status = self.status if self.status is not None else 500
        if record.error_code is None and self._is_error():
            record.error_code = _error_code(bytes(self._error_body)) or f"http_{record.status}"


def _error_code(body: bytes) -> str | None:
    try:
        error: Any = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    code = error.get("code") or error.get("type") if isinstance(error, dict) else None
    return str(code) if code else None
