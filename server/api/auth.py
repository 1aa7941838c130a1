"""The optional API key: with `api_key` set, every route but /health wants `Authorization: Bearer KEY`."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.api.state import server_state
from server.errors import AuthenticationError


async def require_api_key(request: Request) -> None:
    expected = server_state(request).settings.api_key
    if expected is None:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationError("Missing API key: send it as 'Authorization: Bearer YOUR_KEY'.")
    if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        raise AuthenticationError("Incorrect API key provided.")
