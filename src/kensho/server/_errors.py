"""Kensho errors as OpenAI-style HTTP errors, with the status a client can act on.

========================  ======  ====================  =============================
error                     status  ``error.type``        headers
========================  ======  ====================  =============================
QueueFullError            429     ``rate_limit_error``  ``Retry-After`` (queue full,
                                                        shed, overloaded)
CircuitOpenError          503     ``server_error``      ``Retry-After`` (no engine)
EngineError               503     ``server_error``      ``Retry-After``
TaskTimeoutError          504     ``timeout_error``
InvalidRequestError       400     ``invalid_request_error``
========================  ======  ====================  =============================

The body is always ``{"error": {"message", "type", "param", "code"}}``, which the
official ``openai`` client turns into its typed exceptions.
"""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from kensho.errors import (
    CircuitOpenError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
    TaskTimeoutError,
)

__all__ = ["APIError", "error_body", "error_for_exception", "error_response"]


class APIError(Exception):
    """An error to answer with ``status`` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after


def error_body(err: APIError) -> dict[str, object]:
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


def error_response(err: APIError) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


def error_for_exception(exc: BaseException) -> APIError | None:
    """The API error for a Kensho runtime error, or ``None`` if it is not one."""
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), code=exc.code, param=exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            str(exc),
            type="rate_limit_error",
            code=f"queue_{exc.reason}",
            retry_after=exc.retry_after,
        )
    if isinstance(exc, CircuitOpenError):
        return APIError(
            503, str(exc), type="server_error", code="engine_unavailable",
            retry_after=exc.retry_after,
        )  # fmt: skip
    if isinstance(exc, TaskTimeoutError):
        return APIError(504, str(exc), type="timeout_error", code=f"timeout_{exc.phase}")
    if isinstance(exc, EngineError):
        return APIError(503, str(exc), type="server_error", code="engine_error", retry_after=5.0)
    return None
