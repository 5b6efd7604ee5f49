"""The hub's JSON API from the command line (``kestrel-hub frames``, ``kestrel-hub label --hub``): httpx with
the token of ``--token-file``; the hub's one-line reasons become Kestrel errors (exit 2 for a refused
request, 3 when the hub cannot be reached or fails)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, Optional

import httpx

from hub.errors import ApiRefused as ApiRefused  # defined in hub.errors, importable from here too
from hub.errors import NotFound, TransportError

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "KESTREL_HUB_URL"
TOKEN_FILE_ENV = "KESTREL_HUB_TOKEN_FILE"
DEFAULT_TIMEOUT_S = 30.0


def add_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--hub", default=None if required else os.environ.get(URL_ENV, DEFAULT_URL), metavar="URL",
                   help=f"the hub's HTTP address (default ${URL_ENV} or {DEFAULT_URL})")
    p.add_argument("--token-file", default=os.environ.get(TOKEN_FILE_ENV, ""), metavar="FILE",
                   help=f"file holding an API token (default ${TOKEN_FILE_ENV}, else ~/.config/kestrel/hub-token); "
                        "`kestrel-hub tokens add` makes one")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")


class HubApi:
    def __init__(self, url: str, token: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not url.startswith(("http://", "https://")):
            raise ApiRefused(f"--hub {url!r}: give the hub's HTTP address, like {DEFAULT_URL}")
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "kestrel-hub-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request on the CLI's stderr
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HubApi:
        from hub.auth import read_token_file
        from proto.hubcreds import find_token_file

        path = find_token_file(args.token_file)  # the flag, $KESTREL_HUB_TOKEN_FILE, ~/.config/kestrel/hub-token
        return cls(args.hub, read_token_file(path) if path else "", args.timeout)

    def __enter__(self) -> HubApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self.client.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise TransportError(f"the hub at {self.url} did not answer in time ({exc}); retry later") from exc
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot reach the hub at {self.url}: {exc}; is `kestrel-hub serve` running "
                                 "there (see --hub)?") from exc
        if resp.status_code < 400:
            return resp
        try:
            detail = str(resp.json().get("detail", "")) or resp.reason_phrase
        except ValueError:
            detail = resp.reason_phrase
        if resp.status_code == 401:
            raise ApiRefused(f"the hub wants a valid token: {detail} (--token-file)")
        if resp.status_code == 404:
            raise NotFound(detail)
        if resp.status_code >= 500:
            raise TransportError(f"the hub failed ({resp.status_code}): {detail}")
        raise ApiRefused(f"the hub refused the request ({resp.status_code}): {detail}")

    def get(self, path: str, params: Optional[Dict[str, Any]] = None) -> Any:
        return self._call("GET", path, params={k: v for k, v in (params or {}).items() if v not in (None, "")}).json()

    def post(self, path: str, body: Any) -> Any:
        return self._call("POST", path, json=body).json()

    def raw(self, path: str) -> bytes:
        return self._call("GET", path).content
