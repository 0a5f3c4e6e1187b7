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
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from kensho.errors import (
    CircuitOpenError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
    TaskTimeoutError,
)

__all__ = ["APIError", "error_body", "error_for_exception", "error_response", "invalid_body"]


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


def invalid_body(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The 400 for a body that failed validation, naming its first bad field.

    ``errors`` are pydantic's (``loc`` may start with FastAPI's ``"body"``). A body
    that is not JSON says so, with the parser's reason. 400, as OpenAI answers invalid
    parameters (its client raises ``BadRequestError``).
    """
    first: Mapping[str, Any] = errors[0] if errors else {"msg": "invalid request"}
    if first.get("type") == "json_invalid":
        why = first.get("ctx", {}).get("error") or first["msg"]
        return APIError(400, f"request body is not valid JSON: {why}")
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = f"{field}: {first['msg']}" if field else str(first["msg"])
    return APIError(400, message, param=field)


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
