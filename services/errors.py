"""The OpenAI error envelope, shared by the router and the sidecar.

Every non-2xx answer of ours is ``{"error": {"message", "type", "param", "code"}}``
plus a ``component`` field naming who failed (``router``, ``sidecar``, ``ollama``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# HTTP status -> OpenAI error type, as the OpenAI SDK maps them to exception classes.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str,
    status: int = 400,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    component: str | None = None,
) -> dict[str, Any]:
    err: dict[str, Any] = {
        "message": message,
        "type": type or error_type_for(status),
        "param": param,
        "code": code,
    }
    if component:
        err["component"] = component
    return {"error": err}


class APIError(Exception):
    """Raise anywhere in a request handler to answer with an OpenAI error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        component: str | None = None,
        headers: dict[str, str] | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.component = component
        self.headers = dict(headers or {})
        if should_retry is not None:
            self.headers["x-should-retry"] = "true" if should_retry else "false"

    def body(self) -> dict[str, Any]:
        return error_body(
            self.message,
            self.status,
            type=self.type,
            param=self.param,
            code=self.code,
            component=self.component,
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as one SSE data event, for failures after a stream has started."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def error_response(status: int, message: str, **kw: Any) -> JSONResponse:
    return APIError(status, message, **kw).response()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "Request body is not valid JSON.", None
    return (f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."), param


def install_error_handlers(app: FastAPI, component: str) -> None:
    """Make FastAPI/Starlette answer every error in the OpenAI envelope."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.component is None:
            exc.component = component
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(
            400,
            message,
            param=param,
            code="invalid_value",
            component=component,
            headers={"x-should-retry": "false"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return error_response(
            exc.status_code, message, component=component, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(
            500, f"Internal error in {component}: {type(exc).__name__}", component=component
        )
