"""The hub's HTTP server: /healthz (JSON) and /metrics (Prometheus text); the dashboard mounts here later.

``extra_routes`` maps a path to a function returning (status, content type, body) so other parts
(the dashboard) can add pages without touching this module.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

from hub.errors import TransportError

log = logging.getLogger("hub.http")

Route = Callable[[str], Tuple[int, str, bytes]]


def prometheus_text(health: Dict[str, Any]) -> str:
    """Render the health snapshot as Prometheus text exposition format."""
    ing = health.get("ingest", {})
    lines: List[str] = []

    def metric(name: str, kind: str, help_: str, samples: List[Tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}")

    metric("kestrel_hub_up", "gauge", "1 while the hub serves.", [("", 1)])
    metric("kestrel_hub_store_up", "gauge", "1 when the store answered the last ping.",
           [("", 1 if health.get("store", {}).get("ok") else 0)])
    metric("kestrel_hub_broker_connected", "gauge", "1 while the ingest is connected to the broker.",
           [("", 1 if health.get("broker", {}).get("connected") else 0)])
    metric("kestrel_hub_ingest_paused", "gauge", "1 while the ingest waits for an unavailable store.",
           [("", 1 if ing.get("paused") else 0)])
    metric("kestrel_hub_ingest_threads_alive", "gauge", "1 while the ingest's validate and commit threads run.",
           [("", 1 if ing.get("threads_alive") else 0)])
    metric("kestrel_hub_ingest_commit_ms_max", "gauge", "Slowest batch commit so far (ms).",
           [("", float(ing.get("commit_ms_max", 0)))])
    for key, help_ in (("received", "MQTT messages taken from the broker."),
                       ("stored", "Frames newly stored."),
                       ("duplicates", "Frames already stored (redeliveries)."),
                       ("telemetry", "Telemetry messages applied."),
                       ("status", "Status messages applied."),
                       ("acked", "Messages acknowledged to the broker."),
                       ("store_retries", "Batch commits retried after a store failure."),
                       ("dead_lettered", "Payloads kept in the dead-letter folder instead of the store."),
                       ("dropped_qos0", "Telemetry (QoS 0) dropped because the in-memory queue was full."),
                       ("commits", "Batches committed to the store."),
                       ("receipts", "Storage receipts published to devices (one per device and batch)."),
                       ("frames_receipted", "Frames named durable in storage receipts."),
                       ("frames_refused_receipted", "Frames named refused for good in storage receipts."),
                       ("commit_ms", "Milliseconds spent committing batches (with commits: the mean).")):
        value = ing.get(f"{key}_total", 0) if key == "commit_ms" else ing.get(key, 0)
        metric(f"kestrel_hub_ingest_{key}_total", "counter", help_, [("", float(value))])
    metric("kestrel_hub_ingest_rejected_total", "counter", "Payloads rejected, per reason.",
           [(f'{{reason="{r}"}}', float(n)) for r, n in sorted(ing.get("rejected", {}).items())])
    broker = health.get("broker", {})
    metric("kestrel_hub_mqtt_sessions_lost_total", "counter",
           "Connections on which the broker no longer had the hub's session (frames it held are gone; "
           "devices were asked to resend).", [("", float(broker.get("sessions_lost", 0)))])
    if "restarts" in broker:
        metric("kestrel_hub_embedded_broker_restarts_total", "counter", "Embedded Mosquitto restarts.",
               [("", float(broker["restarts"]))])
    return "\n".join(lines) + "\n"


class HttpServer:
    def __init__(self, bind: str, port: int, health: Callable[[], Dict[str, Any]],
                 extra_routes: Optional[Dict[str, Route]] = None) -> None:
        self.health = health
        self.routes: Dict[str, Route] = dict(extra_routes or {})
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                try:
                    status, ctype, body = outer.handle(path, self.path)
                except Exception as exc:  # a broken page must not kill the server
                    log.exception("HTTP %s failed", path)
                    status, ctype, body = 500, "text/plain", f"internal error: {exc}\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("%s " + format, self.address_string(), *args)

        try:
            self.server = ThreadingHTTPServer((bind, port), Handler)
        except OSError as exc:
            raise TransportError(f"cannot listen for HTTP on {bind}:{port}: {exc.strerror or exc}; is another "
                                 "hub running, or is the port taken? Set [http] port (0 = any free port)") \
                from exc
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread: Optional[threading.Thread] = None

    def handle(self, path: str, full: str) -> Tuple[int, str, bytes]:
        if path == "/healthz":
            h = self.health()
            body = (json.dumps(h, indent=1) + "\n").encode()
            return (200 if h.get("ok") else 503), "application/json", body
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", prometheus_text(self.health()).encode()
        route = self.routes.get(path)
        if route is not None:
            return route(full)
        return 404, "text/plain", b"not found\n"

    def start(self) -> HttpServer:
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
