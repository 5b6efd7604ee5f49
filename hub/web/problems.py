"""The errors a request can be refused with (status + one line); hub/web/errors.py turns them into answers."""

from __future__ import annotations


class WebError(Exception):
    """A request refused with ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class LoginRequired(WebError):
    """No token and no session (401): pages redirect to the login page, the API answers 401."""

    def __init__(self, detail: str = "log in first: send Authorization: Bearer <token> or log in at /login") -> None:
        super().__init__(401, detail)
