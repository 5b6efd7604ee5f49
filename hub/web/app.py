"""``create_app(ctx)``: the FastAPI app of the hub's HTTP port (dashboard, JSON API, /healthz, /metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from hub.web import api, errors, images, login, ops, pages
from hub.web.context import WebContext

STATIC = Path(__file__).resolve().parents[1] / "static"
# Pages load only this hub's own scripts, styles and images; nothing from elsewhere, never framed.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def create_app(ctx: WebContext) -> FastAPI:
    from hub.web.images import ThumbCache

    if ctx.thumbs is None:
        ctx.thumbs = ThumbCache(ctx.http.thumb_cache_mb * 1024 * 1024)
    app = FastAPI(title="Kestrel hub", version=ctx.version or "0", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="The hub's JSON API: the fleet, the frames to label, the models, the charts. "
                              "Authenticate with `Authorization: Bearer <token>` (`kestrel-hub tokens add`).")
    app.state.ctx = ctx
    errors.install(app)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy", CSP)
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    for router in (ops.router, login.router, api.router, images.router, pages.router):
        app.include_router(router)
    return app
