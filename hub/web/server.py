"""Run the web app with uvicorn on a thread of the hub process, on a socket bound before it starts (so a
taken port is a one-line error at start, and port 0 reports the port it got)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Optional

import uvicorn

from hub.errors import TransportError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
GRACEFUL_S = 2  # open requests (a slow page, a long poll) get this long at shutdown


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: a response's header and body writes go out at once instead of
    # the body waiting for the client's delayed ACK of the header (~40 ms per request on keep-alive)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}; is another hub "
                             "running, or is the port taken? Set [http] port (0 = any free port)") from exc
    sock.set_inheritable(False)
    return sock


class WebServer:
    def __init__(self, app: Any, host: str, port: int) -> None:
        self.sock = bind(host, port)
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", log_level="warning",
                                timeout_graceful_shutdown=GRACEFUL_S, server_header=False)
        self.server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    def start(self) -> WebServer:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise TransportError(f"the HTTP server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S + GRACEFUL_S)
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
