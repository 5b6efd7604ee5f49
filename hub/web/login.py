"""``GET/POST /login`` (a token in, a session cookie out) and ``POST /logout``; see hub/web/principal.py."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from hub.auth import READ, authenticate
from hub.errors import WebError
from hub.store.authrecords import SessionRecord
from hub.web.context import WebContext, ctx_of
from hub.web.principal import LOGIN_COOKIE, SESSION_COOKIE, check_csrf, hash_value, session_of
from hub.web.render import render

router = APIRouter(include_in_schema=False)


def _safe_next(target: str) -> str:
    """Only a path on this hub (no scheme, no host, no //evil.example)."""
    parts = urlsplit(target or "/")
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")


@router.get("/login")
def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002 - the query parameter's name
    value = secrets.token_urlsafe(24)
    response = render(request, "login.html", {"csrf_login": value, "next": _safe_next(next), "error": ""})
    _cookie(response, request, LOGIN_COOKIE, value, 3600)
    return response


@router.post("/login")
def login(request: Request, token: str = Form(""), csrf: str = Form(""),
          next: str = Form("/")) -> Response:  # noqa: A002
    ctx: WebContext = ctx_of(request)
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie or not csrf or not hmac.compare_digest(cookie.encode(), csrf.encode()):
        raise WebError(403, "the login form expired or came from another site; open /login again")
    principal = authenticate(ctx.store, token.strip())
    if principal is None or not principal.can(READ):
        value = secrets.token_urlsafe(24)
        error = "That token is not valid (unknown or revoked)." if principal is None else \
            f"A token of role {principal.role} is for a machine, not for the dashboard."
        page = render(request, "login.html", {"csrf_login": value, "next": _safe_next(next), "error": error},
                      status=401 if principal is None else 403)
        _cookie(page, request, LOGIN_COOKIE, value, 3600)
        return page
    sid = secrets.token_urlsafe(32)
    now = ctx.now_ms()
    lifetime_ms = int(ctx.http.session_hours * 3600 * 1000)
    ctx.store.prune_sessions(now)
    ctx.store.add_session(SessionRecord(hash_value(sid), principal.name, secrets.token_urlsafe(24), now,
                                        now + lifetime_ms))
    response = RedirectResponse(_safe_next(next), status_code=303)
    _cookie(response, request, SESSION_COOKIE, sid, lifetime_ms // 1000)
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    session = session_of(request)
    if session is not None:
        check_csrf(request, session, csrf)
        ctx_of(request).store.delete_session(session.id_hash)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
