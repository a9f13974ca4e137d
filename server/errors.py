"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause is a 4xx with a one-line message; FastAPI's 422 for
validation errors and Starlette's plain-text errors are replaced so clients (the official
``openai`` package included) always get the same JSON body.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import MoepagerError

log = logging.getLogger("moepager.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}

# reason label of moepager_requests_rejected_total for each status we return
REJECT_REASONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 429: "queue_full",
                  503: "unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.reason = reason or REJECT_REASONS.get(status, "error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code if code is not None else status}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _count_rejection(request: Request, reason: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.requests_rejected.labels(reason=reason).inc()


def _unsupported_fields(errors: list[dict]) -> tuple[str, str | None] | None:
    """One message naming every field the request sent that moepager does not take."""
    from server.protocol import UNSUPPORTED_FIELDS

    names = []
    for e in errors:
        if e.get("type") == "extra_forbidden":
            names.append(".".join(str(p) for p in e.get("loc", ()) if p != "body"))
    if not names:
        return None
    reasons = []
    for name in names:
        reason = UNSUPPORTED_FIELDS.get(name.rsplit(".", 1)[-1])
        reasons.append(f"{name} ({reason})" if reason else f"{name} (unrecognized request argument)")
    plural = "s" if len(names) > 1 else ""
    return f"unsupported field{plural}: {'; '.join(reasons)}", names[0]


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    unsupported = _unsupported_fields(errors)
    if unsupported is not None:
        return unsupported
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _count_rejection(request, exc.reason)
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count_rejection(request, "invalid_request")
        message, param = _describe_validation(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 422:
            status = 400
        return error_response(status, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(MoepagerError)
    async def _moepager_error(request: Request, exc: MoepagerError) -> JSONResponse:
        _count_rejection(request, "invalid_request")
        return error_response(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")
