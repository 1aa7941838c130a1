"""Server-sent events and the client connection: encoding `data:` events, the SSE response, and waiting for
something while noticing that the client went away."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from server.api.errors import ClientDisconnectedError

T = TypeVar("T")

DONE_EVENT = b"data: [DONE]\n\n"
PING_INTERVAL_S = 15  # keeps proxies from closing a stream that waits in the queue or in a long prefill
# A send blocks only once the client has left the transport's 64 KiB and the kernel's socket buffers unread
# (hundreds of tokens). A client that then accepts nothing for this long is gone or stuck: without a limit
# its request's undelivered events stay in memory for as long as it keeps the connection open, so any
# number of such clients could pile up output long after their slots were freed.
SEND_TIMEOUT_S = 120.0

log = logging.getLogger(__name__)


def sse_event(payload: dict[str, Any]) -> bytes:
    """One `data:` event. json.dumps escapes newlines, so the payload is always a single data line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _EventSource(EventSourceResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except* SendTimeoutError:  # the data send and the ping may both time out: a group of them
            # sse-starlette has closed the iterator already (its `finally` freed the slots); a stuck client
            # is no server error, so one line instead of a traceback.
            log.warning("closing a stream whose client accepted no data for %g s", self.send_timeout)


def event_source_response(events: AsyncIterator[bytes]) -> EventSourceResponse:
    """sse-starlette runs the iterator, pings, and cancels the iterator when the client disconnects or
    stops reading for SEND_TIMEOUT_S (its `finally` blocks then free the request's slots)."""
    return _EventSource(
        events,
        sep="\n",
        ping=PING_INTERVAL_S,
        send_timeout=SEND_TIMEOUT_S,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _client_disconnected(request: Request) -> None:
    # The body has been read already, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnectedError."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_disconnected(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            # Let the cancelled work unwind (its `finally` blocks free slots) before the caller goes on to
            # touch what it was using, e.g. close the async generator it was advancing.
            await asyncio.wait({work_task})
    if watcher.done() and not watcher.cancelled():
        watcher.exception()  # retrieved, so asyncio does not log it: a broken connection is a disconnect too
    if not work_task.cancelled():
        return work_task.result()
    raise ClientDisconnectedError("The client disconnected before the answer was ready.")
