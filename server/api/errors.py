"""The one place where errors become OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}.

Typed errors (server/errors.py) carry their own status and type; request validation errors (FastAPI would
answer 422) become 400 with `param` naming the offending field; routing errors (404/405) keep their status;
anything unexpected becomes a logged 500 in `catch_unexpected_errors` so it never takes the server down.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import (
    ApiError,
    EngineFailureError,
    ModelOverloadedError,
    QueueFullError,
    RateLimitExceededError,
    RpcWorkerLostError,
)

log = logging.getLogger(__name__)

# Location parts pydantic adds for the member of a union it tried ("str", "list[int]", "function-after[...]");
# they are not fields and would make `param` unreadable.
_UNION_MEMBER_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "null"})

_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


class ClientDisconnectedError(ApiError):
    """The client went away before its answer was ready; nobody reads this response."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_disconnected"


def error_body(message: str, *, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def api_error_body(exc: ApiError) -> dict[str, Any]:
    return error_body(exc.message, error_type=exc.error_type, param=exc.param, code=exc.code)


def api_error_response(exc: ApiError) -> JSONResponse:
    retry = isinstance(exc, (QueueFullError, RateLimitExceededError, ModelOverloadedError, RpcWorkerLostError))
    headers = {"Retry-After": str(getattr(exc, "retry_after_s", 1))} if retry else None
    return JSONResponse(api_error_body(exc), status_code=exc.status_code, headers=headers)


def internal_error_body() -> dict[str, Any]:
    return error_body(
        "The server had an internal error while processing your request; it has been logged.",
        error_type="server_error",
        code="internal_error",
    )


def stream_error_payload(exc: BaseException) -> bytes:
    """The JSON of an error that happens after an SSE stream has started (sent as a `data:` event)."""
    body = api_error_body(exc) if isinstance(exc, ApiError) else internal_error_body()
    return json.dumps(body, ensure_ascii=False).encode()


def format_location(location: Sequence[int | str]) -> str | None:
    """('body', 'messages', 0, 'content') → 'messages[0].content'; None for the body itself."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_MEMBER_TAGS or "[" in part:
            continue
        else:
            path += f".{part}" if path else part
    return path or None


def _field_location(error: Any) -> tuple[int | str, ...]:
    location = tuple(error.get("loc", ()))
    return location[1:] if location[:1] in (("body",), ("query",), ("path",)) else location


def _validation_message(error: Any, param: str | None) -> str:
    kind = error.get("type", "")
    message = str(error.get("msg", "invalid value"))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"We could not parse the JSON body of your request ({detail}). The body must be valid JSON."
    if kind == "missing":
        return f"Missing required parameter: '{param}'." if param else "The request body is missing."
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"Invalid value for '{param}': {message}" if param else f"Invalid request body: {message}"


def validation_error_to_api(errors: Sequence[Any]) -> dict[str, Any]:
    """The body for a list of pydantic/FastAPI validation errors: the deepest one is the most specific."""
    if not errors:
        return error_body("Invalid request.", error_type="invalid_request_error")
    error = max(errors, key=lambda e: len(_field_location(e)))  # max keeps the first of equal depth
    location = _field_location(error)
    param = None if error.get("type") == "json_invalid" else format_location(location)
    return error_body(
        _validation_message(error, param),
        error_type="invalid_request_error",
        param=param,
        code="invalid_json" if error.get("type") == "json_invalid" else "invalid_value",
    )


async def _handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if isinstance(exc, EngineFailureError) or exc.status_code >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
    return api_error_response(exc)


def _is_json_content_type(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    body = validation_error_to_api(exc.errors())
    content_type = request.headers.get("content-type", "")
    if body["error"]["param"] is None and not _is_json_content_type(content_type):
        # FastAPI reads a body as JSON only when it is declared as such (curl -d sends a form type)
        body["error"]["message"] = (
            f"The request body must be a JSON object sent with 'Content-Type: application/json' "
            f"(got {content_type or 'no content type'!r})."
        )
    return JSONResponse(body, status_code=400)


async def _handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    body = error_body(message, error_type=error_type, code=_HTTP_ERROR_CODES.get(exc.status_code))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)


# What every error answer is, as the OpenAPI document describes it.
_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OpenAIError",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
_ERROR_RESPONSES = {
    "400": "Invalid request (a validation error names the field in `param`)",
    "4XX": "Another client error: unknown model or route, missing API key, full queue (429), ...",
    "5XX": "Server error: model not loaded yet (503), timeout (504), engine failure",
}


def document_openai_errors(app: FastAPI) -> None:
    """Make the app's OpenAPI document say what errors look like here: FastAPI documents a 422 with its own
    validation body on every route with parameters, but this server answers 400 with OpenAI's error body
    (as it does every 4xx and 5xx). Clients and fuzzers generated from the document then expect the truth."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            for item in document.get("paths", {}).values():
                for operation in item.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    for status, description in _ERROR_RESPONSES.items():
                        content = {"application/json": {"schema": _ERROR_SCHEMA}}
                        responses.setdefault(status, {"description": description, "content": content})
            schemas = document.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):  # only the 422s referred to them
                schemas.pop(unused, None)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to adjust the document


class CatchUnexpectedErrors:
    """ASGI middleware: an exception no handler knows becomes a logged 500 JSON error.

    Starlette's own catch-all re-raises after answering (the ASGI server then logs it a second time); this
    one sits inside it and ends the matter. If the response had already started, there is nothing left to
    answer with: the error is logged and the response is cut short.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                return
            response = JSONResponse(internal_error_body(), status_code=500)
            await response(scope, receive, send)
