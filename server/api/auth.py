"""Who may call each route. Every route but /health depends on `require_api_key` (the `inference` scope) or
`require_admin` (the `admin` scope): the caller is authenticated against the current auth snapshot (named
keys, --api-key's built-in key, JWT; server/auth), its principal set as `request.state.principal`, its scope
checked, and its rate limits charged. `RateLimitHeaders` puts the x-ratelimit-* headers on every answer."""

from __future__ import annotations

import json
from typing import Any, cast

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth.ratelimit import estimated_tokens
from server.auth.snapshot import Auth, require_scope

RATELIMIT_HEADERS_STATE = "ratelimit_headers"


def app_auth(connection: HTTPConnection) -> Auth:
    return cast(Auth, connection.app.state.auth)


async def _json_body(request: Request) -> Any:
    """The request's JSON body for the token estimate; None when there is none (the route says what is wrong)."""
    if request.method != "POST":
        return None
    try:
        return json.loads(await request.body())
    except ValueError:
        return None


async def _authorize(request: Request, scope: str) -> None:
    auth = app_auth(request)
    principal = auth.snapshot.authenticate(request.headers.get("authorization", ""))
    request.state.principal = principal
    require_scope(principal, scope)
    tokens = estimated_tokens(await _json_body(request)) if principal.limits.tpm is not None else 0
    headers, exceeded = auth.limiter.admit(principal, tokens)
    setattr(request.state, RATELIMIT_HEADERS_STATE, headers)
    if exceeded is not None:
        raise exceeded


async def require_api_key(request: Request) -> None:
    """The inference routes (/v1/*, /tokenize, /detokenize)."""
    await _authorize(request, "inference")


async def require_admin(request: Request) -> None:
    """/metrics, /slots, /plan and the audit endpoints."""
    await _authorize(request, "admin")


class RateLimitHeaders:
    """ASGI middleware: the x-ratelimit-* headers the route's admission computed go on its answer, whatever
    it is (a JSON body, a stream, an error such as the 429 itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get("state", {}).get(RATELIMIT_HEADERS_STATE) or {}
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
