"""Typed errors. Each knows its HTTP status and OpenAI error type; api/errors.py maps them in one place."""

from __future__ import annotations


class ApiError(Exception):
    """An error a client should see as OpenAI-style JSON: {"error": {message, type, param, code}}."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(ApiError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(ApiError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class AuthenticationError(ApiError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(ApiError):
    """Valid credentials without the scope this route needs."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "insufficient_scope"


class RateLimitExceededError(ApiError):
    """A principal's requests or tokens per minute are spent; the client should retry after `retry_after_s`."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFullError(ApiError):
    """The waiting queue is at its bound; the client should retry after `retry_after_s`."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(ApiError):
    status_code = 504
    error_type = "timeout_error"
    code = "request_timeout"


class ServiceUnavailableError(ApiError):
    status_code = 503
    error_type = "server_error"
    code = "unavailable"


class ModelOverloadedError(ServiceUnavailableError):
    """A model that does not fit beside the models in use waited its bounded time (server/fleet); the client should
    retry after `retry_after_s`."""

    code = "model_overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RpcWorkerLostError(ServiceUnavailableError):
    """An RPC worker the models ran on died (bindings/rpc.py): nothing is served until the server has replaced its
    process, without the worker or with it back (server/rpc/failover.py); the client should retry after
    `retry_after_s`."""

    code = "rpc_worker_lost"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineFailureError(ApiError):
    """The backend failed while this request was in its batch (llama_decode error)."""

    status_code = 500
    error_type = "server_error"
    code = "decode_failed"
