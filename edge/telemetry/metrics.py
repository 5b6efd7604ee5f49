"""The edge's Prometheus ``/metrics`` through ``prometheus_client``.

The daemon's figures live in :class:`edge.telemetry.service.Stats`, the publisher and the tegrastats
reader; a custom collector (``TelemetryService.collect``) turns them into metric families at scrape
time, in the daemon's own ``CollectorRegistry`` (never the library's global one). :class:`MetricsServer`
serves that registry with ``prometheus_client``'s WSGI app on a stdlib ``wsgiref`` server in a thread,
answering 404 on every path but ``/metrics``.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Dict, Iterable, List, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import make_wsgi_app

from proto.errors import ConfigError

log = logging.getLogger(__name__)


class _Collector:
    """Adapts a ``collect()`` callable to prometheus_client's collector interface."""

    def __init__(self, collect: Callable[[], Iterable[Any]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Any]:
        return self._collect()


def registry_for(collect: Callable[[], Iterable[Any]]) -> CollectorRegistry:
    """A private registry whose one collector calls ``collect()`` at every scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(collect))  # type: ignore[arg-type]
    return registry


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server API)
        log.debug("metrics: " + format, *args)


def _only_metrics(app: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(environ: dict, start_response: Callable[..., Any]) -> List[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/metrics", "/metrics/"):
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"only /metrics is served here\n"]
        result: List[bytes] = app(environ, start_response)
        return result

    return wrapped


class MetricsServer:
    """Serves ``registry`` on ``http://{bind}:{port}/metrics``; port 0 asks the OS for a free port
    (the bound port is in ``.port`` after :meth:`start`)."""

    def __init__(self, bind: str, port: int, registry: CollectorRegistry) -> None:
        self.bind = bind
        self.port = port
        self.registry = registry
        self._server: Optional[WSGIServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        app = _only_metrics(make_wsgi_app(self.registry))
        try:
            family = socket.getaddrinfo(self.bind, self.port, type=socket.SOCK_STREAM)[0][0]
            server_class = type("MetricsHTTPServer", (_ThreadingServer,), {"address_family": family})
            self._server = make_server(self.bind, self.port, app, server_class, _QuietHandler)
        except OSError as exc:  # ports are validated 0..65535 by the config
            raise ConfigError(f"cannot serve /metrics on {self.bind}:{self.port}: "
                              f"{getattr(exc, 'strerror', None) or exc}; "
                              f"change [telemetry] metrics_port/metrics_bind (0 = off)") from exc
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


def jetson_families(sample: Any) -> List[Any]:
    """The tegrastats readings (an edge.telemetry.tegrastats.JetsonSample) as metric families; what the
    line did not have is left out rather than reported as 0."""
    from prometheus_client.core import GaugeMetricFamily

    out: List[Any] = []
    if sample.cpu_core_load_pct:
        fam = GaugeMetricFamily("kestrel_edge_tegra_cpu_load_percent",
                                "CPU load per core (tegrastats), percent; cores that are off are left out.",
                                labels=["core"])
        for i, value in enumerate(sample.cpu_core_load_pct):
            if value is not None:
                fam.add_metric([str(i)], value)
        out.append(fam)
    for name, value, help_text in (
            ("gpu_load_percent", sample.gpu_load_pct, "GPU (GR3D) load, percent."),
            ("gpu_frequency_hertz", None if sample.gpu_freq_mhz is None else sample.gpu_freq_mhz * 1e6,
             "GPU (GR3D) clock."),
            ("emc_load_percent", sample.emc_load_pct, "External memory controller (memory bandwidth) load, percent."),
            ("emc_frequency_hertz", None if sample.emc_freq_mhz is None else sample.emc_freq_mhz * 1e6,
             "External memory controller clock."),
            ("ram_used_bytes", None if sample.ram_used_mb is None else sample.ram_used_mb * 1024 * 1024,
             "RAM in use (tegrastats)."),
            ("ram_total_bytes", None if sample.ram_total_mb is None else sample.ram_total_mb * 1024 * 1024,
             "RAM available to applications (tegrastats).")):
        if value is not None:
            out.append(GaugeMetricFamily(f"kestrel_edge_tegra_{name}", help_text, value=value))
    if sample.temperature_c:
        fam = GaugeMetricFamily("kestrel_edge_tegra_temperature_celsius", "Thermal zone temperatures (tegrastats).",
                                labels=["sensor"])
        for sensor, value in sorted(sample.temperature_c.items()):
            fam.add_metric([sensor], value)
        out.append(fam)
    if sample.power_mw:
        fam = GaugeMetricFamily("kestrel_edge_tegra_power_watts", "Instantaneous power per rail (tegrastats).",
                                labels=["rail"])
        for rail, mw in sorted(sample.power_mw.items()):
            fam.add_metric([rail], mw / 1000.0)
        out.append(fam)
    return out


SOURCE_GAUGES = (("fps", "Frames of this source inferred per second (recent window)."),
                 ("queue_depth", "Frames of this source waiting for inference."),
                 ("up", "1 while the source is open (0 while a live source reconnects, or after it ended)."))
SOURCE_COUNTERS = (("frames_captured", "Frames read from this source."),
                   ("frames_processed", "Frames of this source run through the model."),
                   ("frames_sampled", "Frames of this source selected for the hub."),
                   ("frames_dropped", "Frames of this source dropped because inference fell behind."),
                   ("frames_corrupt", "Frames this source delivered unreadable."),
                   ("errors", "Frames of this source that failed on the inference thread."),
                   ("reconnects", "Failed opens and lost streams of this (live) source."))


def source_families(sources: List[Dict[str, Any]]) -> List[Any]:
    """Per-camera metric families, labelled ``source`` (``Stats.snapshot()["sources"]``), named
    ``kestrel_edge_source_*`` beside the device-wide totals."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    out: List[Any] = []
    if not sources:
        return out
    for key, help_text in SOURCE_GAUGES:
        fam = GaugeMetricFamily(f"kestrel_edge_source_{key}", help_text, labels=["source"])
        for src in sources:
            fam.add_metric([src["name"]], float(src[key]))
        out.append(fam)
    for key, help_text in SOURCE_COUNTERS:
        cfam = CounterMetricFamily(f"kestrel_edge_source_{key}", help_text, labels=["source"])
        for src in sources:
            cfam.add_metric([src["name"]], float(src[key]))
        out.append(cfam)
    return out
