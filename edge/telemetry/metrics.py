"""A tiny Prometheus ``/metrics`` endpoint (stdlib http.server in a thread) and text-format helpers.

Exposition format 0.0.4: ``# HELP``/``# TYPE`` lines then ``name{labels} value``.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Mapping, Optional

from proto.errors import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class TextBuilder:
    """Collects metric families and renders them in the Prometheus text format."""

    def __init__(self) -> None:
        self._lines: List[str] = []

    def add(self, name: str, kind: str, help_text: str, value: float,
            labels: Optional[Dict[str, str]] = None) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in sorted(labels.items())) + "}"
        self._lines.append(f"{name}{label_text} {format_value(value)}")

    def add_family(self, name: str, kind: str, help_text: str, label: str, values: Mapping[str, float]) -> None:
        """One metric family with one sample per value of ``label`` (HELP and TYPE once)."""
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for key in sorted(values):
            self._lines.append(f'{name}{{{label}="{escape_label(key)}"}} {format_value(values[key])}')

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


class MetricsServer:
    """Serves ``render()`` on ``http://{bind}:{port}/metrics``; port 0 asks the OS for a free port
    (the bound port is in ``.port`` after :meth:`start`)."""

    def __init__(self, bind: str, port: int, render: Callable[[], str]) -> None:
        self.bind = bind
        self.port = port
        self._render = render
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        render = self._render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render().encode("utf-8")
                except Exception:
                    log.exception("metrics: rendering failed")
                    self.send_error(500, "metrics rendering failed")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server API)
                log.debug("metrics: " + format, *args)

        try:
            self._server = ThreadingHTTPServer((self.bind, self.port), Handler)
        except OSError as exc:  # ports are validated 0..65535 by the config
            raise ConfigError(f"cannot serve /metrics on {self.bind}:{self.port}: "
                              f"{getattr(exc, 'strerror', None) or exc}; "
                              f"change [telemetry] metrics_port/metrics_bind (0 = off)") from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics: serving http://%s:%d/metrics", self.bind, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
