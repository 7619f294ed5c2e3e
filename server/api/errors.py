"""One error type for the routes, rendered in the shape each API family expects: FastAPI's `{"detail": ...}` for the
native endpoints, OpenAI's `{"error": {...}}` under `/v1/images/` (so OpenAI clients raise their usual exceptions)."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

OPENAI_PREFIX = "/v1/images/"
# What a client is told to wait while the server loads its bundle or drains.
NOT_READY_RETRY_SECONDS = 5.0


class ApiError(Exception):
    """Parameters:
    status (`int`): HTTP status.
    message (`str`): what is wrong and, where it helps, what is accepted.
    field (`str`, *optional*): the request field at fault (422s name it like FastAPI's own validation errors).
    headers (`dict`, *optional*): e.g. `retry_headers`.
    reason (`str`, *optional*): the `aptp_rejections_total` reason to count.
    """

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.reason = reason


def retry_headers(seconds: float) -> dict[str, str]:
    """How long a refused client should wait, in the standard `Retry-After` (whole seconds, rounded up) and in
    `retry-after-ms` (what OpenAI's API sends and its clients read first)."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(round(seconds * 1000))}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, message, field=field, reason="invalid")


def _openai_type(status: int) -> str:
    return {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def render_error(request: Request, error: ApiError) -> JSONResponse:
    if request.url.path.startswith(OPENAI_PREFIX):
        status = 400 if error.status == 422 else error.status  # OpenAI answers bad parameters with 400
        body = {"error": {"message": error.message, "type": _openai_type(status), "param": error.field, "code": None}}
        return JSONResponse(body, status_code=status, headers=error.headers)
    if error.field is not None:
        detail = [{"loc": ["body", error.field], "msg": error.message, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=error.status, headers=error.headers)
    return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)


def count_rejection(request: Request, reason: str | None) -> None:
    """Count a refused request in `aptp_rejections_total` by reason."""
    state = getattr(request.app.state, "aptp", None) if "app" in request.scope else None
    metrics = getattr(state, "metrics", None)
    if reason is not None and metrics is not None:
        metrics.rejections.labels(reason=reason).inc()


def install_error_handlers(app: FastAPI) -> None:
    count = count_rejection

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        # Starlette's own refusals (a body that is not readable JSON, an unknown path), in each API's error shape.
        return render_error(request, ApiError(error.status_code, str(error.detail), headers=error.headers))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        count(request, error.reason)
        return render_error(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        count(request, "invalid")
        problems = error.errors()
        if request.url.path.startswith(OPENAI_PREFIX):
            first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
            field = ".".join(str(part) for part in first["loc"] if part != "body") or None
            message = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in problems
            )
            return render_error(request, ApiError(400, message, field=field))
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in problems]
        return JSONResponse({"detail": detail}, status_code=422)
