"""Who is asking: a Bearer token (API clients, the CLIs) or a browser session (a login with a token; the
login and logout routes are hub/web/login.py).

* ``Authorization: Bearer kst_...``: the token's role, on every request.
* A browser logs in at /login with a token; it gets a session cookie (HttpOnly, SameSite=Strict,
  Secure over HTTPS) naming a session in the store, which has its own CSRF token. Every write a
  session makes (the JSON API's POSTs, the logout form) must carry that CSRF token
  (``X-CSRF-Token`` header or ``csrf`` form field); Bearer requests need none (a browser never adds
  that header on its own). The login form itself is protected by a double-submit cookie.
* The token's role and revocation apply at once: a session is checked against its token on every request.

``need(permission)`` is the route dependency; reads need a principal only when ``[http] auth_reads``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Callable, Optional, Tuple

from fastapi import Request

from hub.auth import ANONYMOUS_READER, READ, Principal, authenticate, principal_of
from hub.errors import LoginRequired, WebError
from hub.store.authrecords import SessionRecord
from hub.web.context import ctx_of

SESSION_COOKIE = "kestrel_session"
LOGIN_COOKIE = "kestrel_login"   # the login form's double-submit CSRF value
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"


def hash_value(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _resolve(request: Request) -> Tuple[Optional[Principal], Optional[SessionRecord]]:
    """(principal, session) of the request, computed once per request."""
    cached = getattr(request.state, "auth", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    ctx = ctx_of(request)
    got: Tuple[Optional[Principal], Optional[SessionRecord]] = (None, None)
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise LoginRequired("the Authorization header must be: Bearer <token>")
        principal = authenticate(ctx.store, token.strip())
        if principal is None:
            raise LoginRequired("the token is not valid (unknown or revoked)")
        got = (principal, None)
    else:
        sid = request.cookies.get(SESSION_COOKIE, "")
        if sid and len(sid) <= 200:
            session = ctx.store.get_session(hash_value(sid))
            if session is not None and session.expires_ms > ctx.now_ms():
                principal = principal_of(ctx.store.get_token(session.token_name))
                if principal is not None:
                    got = (principal, session)
    request.state.auth = got
    return got


def current(request: Request) -> Optional[Principal]:
    return _resolve(request)[0]


def session_of(request: Request) -> Optional[SessionRecord]:
    return _resolve(request)[1]


def check_csrf(request: Request, session: SessionRecord, form_value: str = "") -> None:
    sent = request.headers.get(CSRF_HEADER, "") or form_value
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise WebError(403, f"missing or wrong CSRF token: a logged-in browser's writes carry the page's "
                            f"{CSRF_HEADER} (reload the page and try again)")


def need(permission: str) -> Callable[[Request], Principal]:
    """A dependency: the principal, who may do ``permission``; 401 without one, 403 without the role,
    403 for a session's write without its CSRF token."""
    def dependency(request: Request) -> Principal:
        principal, session = _resolve(request)
        if permission == READ and principal is None and not ctx_of(request).http.auth_reads:
            return ANONYMOUS_READER
        if principal is None:
            raise LoginRequired()
        if not principal.can(permission):
            raise WebError(403, f"token {principal.name!r} (role {principal.role}) may not {permission}; ask an "
                                "admin for a token with that role")
        if permission != READ and session is not None:
            check_csrf(request, session)
        return principal
    return dependency
