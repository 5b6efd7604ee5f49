"""Rendering the dashboard's pages: the Jinja2 templates of hub/templates/ with what every page's layout
needs (who is logged in, the session's CSRF token, the hub's version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from hub.auth import DEPLOY, LABEL, Principal
from hub.errors import KestrelError
from hub.web import svg
from hub.web.context import ctx_of
from hub.web.frames import when
from hub.web.principal import current, session_of

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
templates = Jinja2Templates(directory=str(TEMPLATES))
templates.env.globals.update(when=when, svg=svg)


def render(request: Request, name: str, context: Dict[str, Any], status: int = 200) -> HTMLResponse:
    """A page with what every page's layout needs (who is logged in, the CSRF token, the hub version)."""
    ctx = ctx_of(request)
    principal: Optional[Principal] = None
    session = None
    try:
        principal, session = current(request), session_of(request)
    except KestrelError:  # a bad Authorization header: the page (an error page) says so itself
        pass
    base = {"who": principal, "csrf": session.csrf if session else "", "version": ctx.version,
            "auth_reads": ctx.http.auth_reads, "nav": name.split(".")[0], "can_label": bool(principal and
                                                                                       principal.can(LABEL)),
            "can_deploy": bool(principal and principal.can(DEPLOY)), "now_ms": ctx.now_ms()}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


def render_error(request: Request, status: int, detail: str) -> Response:
    try:
        return render(request, "error.html", {"status": status, "detail": detail}, status=status)
    except Exception:  # noqa: BLE001 - the error page must not fail in turn
        return HTMLResponse(f"<p>{status}: {detail}</p>", status_code=status)
