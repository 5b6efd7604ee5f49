"""Every failure of a request is a status code and one line saying what is wrong (never a traceback):
JSON ``{"detail": "..."}`` for the API and images, a small page for the dashboard's pages.

Kestrel's errors map by kind: NotFound 404, a precondition the fleet does not meet (nothing to roll
back) 409, any other bad input (ArtifactError: a bad label, query, deploy request) 400, an unreachable
store or broker (TransportError) 503. A request the framework cannot parse is a 400 naming the field.
"""

from __future__ import annotations

import logging
from typing import Any, Optional
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub.errors import ArtifactError, KestrelError, LoginRequired, NotFound, TransportError, WebError
from hub.web.render import render_error

log = logging.getLogger(__name__)


def wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith(("/api/", "/frames/")) or "application/json" in request.headers.get("accept", "")


def one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line[:500] if line else "error"


def respond(request: Request, status: int, detail: str) -> Response:
    detail = one_line(detail)
    if wants_json(request):
        return JSONResponse({"detail": detail}, status_code=status)
    return render_error(request, status, detail)


def status_of(exc: KestrelError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if getattr(exc, "kind", "") == "failed_precondition":
        return 409
    if isinstance(exc, ArtifactError):
        return 400
    if isinstance(exc, TransportError):
        return 503
    return 500


def _validation_line(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first: Any = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"invalid {where or 'request'}: {first.get('msg', 'not accepted')}{more}"


def install(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        if wants_json(request):
            return JSONResponse({"detail": exc.detail}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="kestrel-hub"'})
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(WebError)
    async def web_error(request: Request, exc: WebError) -> Response:
        return respond(request, exc.status, exc.detail)

    @app.exception_handler(KestrelError)
    async def kestrel_error(request: Request, exc: KestrelError) -> Response:
        status = status_of(exc)
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return respond(request, status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return respond(request, 400, _validation_line(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail: Optional[str] = exc.detail if isinstance(exc.detail, str) else None
        if exc.status_code == 404 and (detail is None or detail == "Not Found"):
            detail = f"nothing at {request.url.path}"
        return respond(request, exc.status_code, detail or "request refused")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # uvicorn logs the traceback (Starlette re-raises after this response); the client gets one line
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return respond(request, 500, "internal error; the hub's log has the details")


__all__ = ["LoginRequired", "WebError", "install", "respond", "wants_json"]
