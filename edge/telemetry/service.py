"""Runtime statistics of the edge daemon, published as MQTT telemetry and Prometheus metrics.

* :class:`Stats` is fed by the capture/inference threads (thread-safe) and summarises: fps over the
  last ``fps_window_s`` seconds, latency p50/p95 (nearest rank, milliseconds) over the last
  ``latency_window`` inferences, counters and uptime, and (since the start) how many frames were
  low confidence and a histogram of every inferred frame's top-1 score (SCORE_BINS equal bins over
  [0, 1]): the hub charts both per model version. The clock is injectable for tests.
* :class:`TelemetryService` publishes a ``kestrel_pb2.Telemetry`` every ``[telemetry] interval_s``
  on ``topics.telemetry(device_id)`` (QoS 0) and serves ``/metrics`` through prometheus_client (names in
  docs/edge-transport.md). On a Jetson it runs ``tegrastats`` (edge.telemetry.tegrastats) and adds its
  readings to both (``Telemetry.jetson``, ``kestrel_edge_tegra_*``).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from edge.config import TelemetryConfig
from edge.telemetry.metrics import MetricsServer, jetson_families, registry_for, source_families
from edge.telemetry.tegrastats import TegrastatsReader, find_tegrastats
from proto import desired, kestrel_pb2
from proto.clock import now_ms

if TYPE_CHECKING:  # pragma: no cover
    from edge.uplink.publisher import Publisher

log = logging.getLogger(__name__)

FPS_WINDOW_S = 10.0
LATENCY_WINDOW = 1000
SCORE_BINS = 20  # top-1 score histogram bins over [0, 1] (Telemetry.score_histogram; the hub reads len())
EPHEMERAL_PORT = -1  # TelemetryService(metrics_port=EPHEMERAL_PORT): let the OS pick a free port (tests)

Clock = Callable[[], float]


def percentile(sorted_values: List[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(math.ceil(q * len(sorted_values))))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _SourceStats:
    """One camera's counters inside :class:`Stats` (guarded by its lock)."""

    __slots__ = ("name", "captured", "processed", "sampled", "dropped", "corrupt", "errors", "queue_depth",
                 "times", "probe")

    def __init__(self, name: str) -> None:
        self.name = name
        self.captured = self.processed = self.sampled = self.dropped = self.corrupt = self.errors = 0
        self.queue_depth = 0
        self.times: Deque[float] = collections.deque()
        self.probe: Optional[SourceProbe] = None


SourceProbe = Callable[[], Tuple[bool, int]]  # -> (up, reconnects) of one source, read at snapshot time


class Stats:
    """Device-wide figures, and the same per source when the callers name one (``source=``): the
    pipeline does for every camera frame, so the per-source counters add up to the device-wide ones."""

    def __init__(self, clock: Clock = time.monotonic, fps_window_s: float = FPS_WINDOW_S,
                 latency_window: int = LATENCY_WINDOW) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self.fps_window_s = fps_window_s
        self._times: Deque[float] = collections.deque()
        self._latencies: Deque[float] = collections.deque(maxlen=latency_window)
        self._sources: Dict[str, _SourceStats] = {}
        self.captured = 0
        self.processed = 0
        self.dropped = 0
        self.corrupt = 0
        self.sampled = 0
        self.low_confidence = 0
        self.score_histogram = [0] * SCORE_BINS
        self.queue_depth = 0
        self.model: Optional[kestrel_pb2.ModelRef] = None
        self.refused: Dict[str, int] = {}  # desired-state messages refused, by reason (proto.desired)

    def _source(self, name: str) -> _SourceStats:
        """The per-source record (created on first use); call with the lock held."""
        rec = self._sources.get(name)
        if rec is None:
            rec = self._sources[name] = _SourceStats(name)
        return rec

    def watch_source(self, name: str, probe: Optional[SourceProbe] = None) -> None:
        """Report ``name`` from now on (before its first frame too); ``probe() -> (up, reconnects)``."""
        with self._lock:
            self._source(name).probe = probe

    def frame_captured(self, source: str = "") -> None:
        with self._lock:
            self.captured += 1
            if source:
                self._source(source).captured += 1

    def frame_dropped(self, n: int = 1, source: str = "") -> None:
        with self._lock:
            self.dropped += n
            if source:
                self._source(source).dropped += n

    def frame_corrupt(self, source: str = "") -> None:
        with self._lock:
            self.corrupt += 1
            if source:
                self._source(source).corrupt += 1

    def frame_sampled(self, source: str = "") -> None:
        with self._lock:
            self.sampled += 1
            if source:
                self._source(source).sampled += 1

    def frame_failed(self, source: str = "") -> None:
        """A frame of ``source`` failed on the inference thread (counted per source only)."""
        if source:
            with self._lock:
                self._source(source).errors += 1

    def inference(self, latency_s: float, top: Optional[float] = None, low_confidence: bool = False,
                  source: str = "") -> None:
        """One inferred frame of ``source``: its latency, its top-1 score (None: unknown) and whether an
        uncertainty rule fired for it."""
        now = self._clock()
        with self._lock:
            self.processed += 1
            if top is not None and top == top:  # NaN never reaches here from the pipeline; be safe
                self.score_histogram[min(SCORE_BINS - 1, max(0, int(top * SCORE_BINS)))] += 1
            if low_confidence:
                self.low_confidence += 1
            self._latencies.append(float(latency_s))
            self._times.append(now)
            self._trim(self._times, now)
            if source:
                rec = self._source(source)
                rec.processed += 1
                rec.times.append(now)
                self._trim(rec.times, now)

    def desired_refused(self, reason: str) -> None:
        """A desired-state message was refused (edge.updater.desiredgate): counted by reason."""
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def set_queue_depth(self, n: int, source: str = "") -> None:
        """The frames queued for inference; per source, the device-wide depth is the sum of the sources'."""
        with self._lock:
            if source:
                self._source(source).queue_depth = int(n)
                self.queue_depth = sum(r.queue_depth for r in self._sources.values())
            else:
                self.queue_depth = int(n)

    def set_model(self, ref: kestrel_pb2.ModelRef) -> None:
        copy = kestrel_pb2.ModelRef()
        copy.CopyFrom(ref)
        with self._lock:
            self.model = copy

    def _trim(self, times: Deque[float], now: float) -> None:
        cutoff = now - self.fps_window_s
        while times and times[0] <= cutoff:
            times.popleft()

    def snapshot(self) -> Dict[str, Any]:
        """fps (inferences per second over the recent window), latency_p50_ms/latency_p95_ms (over the
        recent bounded window), counters, queue_depth, uptime_s, model (a ModelRef or None) and
        ``sources``: one dict per source (name, fps, the frames_* counters, errors, queue_depth, up,
        reconnects) in the order they were first seen."""
        now = self._clock()
        with self._lock:
            self._trim(self._times, now)
            uptime = max(0.0, now - self._start)
            span = min(self.fps_window_s, uptime)
            fps = len(self._times) / span if span > 0 else 0.0
            lat = sorted(self._latencies)
            model = None
            if self.model is not None:
                model = kestrel_pb2.ModelRef()
                model.CopyFrom(self.model)
            sources: List[Dict[str, Any]] = []
            for rec in self._sources.values():
                self._trim(rec.times, now)
                sources.append({"name": rec.name, "fps": len(rec.times) / span if span > 0 else 0.0,
                                "frames_captured": rec.captured, "frames_processed": rec.processed,
                                "frames_sampled": rec.sampled, "frames_dropped": rec.dropped,
                                "frames_corrupt": rec.corrupt, "errors": rec.errors,
                                "queue_depth": rec.queue_depth, "probe": rec.probe})
            snap: Dict[str, Any] = {
                "fps": fps,
                "latency_p50_ms": percentile(lat, 0.50) * 1000.0,
                "latency_p95_ms": percentile(lat, 0.95) * 1000.0,
                "queue_depth": self.queue_depth,
                "frames_captured": self.captured,
                "frames_processed": self.processed,
                "frames_sampled": self.sampled,
                "frames_low_confidence": self.low_confidence,
                "score_histogram": list(self.score_histogram),
                "frames_dropped": self.dropped,
                "frames_corrupt": self.corrupt,
                "uptime_s": uptime,
                "model": model,
                "desired_refused": dict(self.refused),
            }
        for src in sources:  # probes read the sources' own state: outside the lock
            probe = src.pop("probe")
            up, reconnects = probe() if probe is not None else (src["frames_captured"] > 0, 0)
            src["up"], src["reconnects"] = bool(up), int(reconnects)
        snap["sources"] = sources
        return snap


class TelemetryService:
    """Periodic MQTT telemetry plus the Prometheus endpoint.

    ``metrics_port`` overrides ``[telemetry] metrics_port`` (None = use the config;
    ``EPHEMERAL_PORT`` = any free port, read it back from ``.metrics_port`` after :meth:`start`).
    ``.metrics_port`` is 0 while the endpoint is off.
    """

    def __init__(self, cfg: TelemetryConfig, device_id: str, stats: Stats, publisher: Optional[Publisher],
                 metrics_port: Optional[int] = None) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.stats = stats
        self.publisher = publisher
        port = cfg.metrics_port if metrics_port is None else metrics_port
        self._want_port = port
        self.metrics_port = 0
        self._server: Optional[MetricsServer] = None
        self.registry = registry_for(self.collect)
        exe = find_tegrastats(cfg.tegrastats)
        self.tegrastats = TegrastatsReader(exe, cfg.tegrastats_interval_ms) if exe else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.sent = 0

    def start(self) -> None:
        if self._want_port != 0:
            bind_port = 0 if self._want_port == EPHEMERAL_PORT else self._want_port
            self._server = MetricsServer(self.cfg.metrics_bind, bind_port, self.registry)
            self._server.start()
            self.metrics_port = self._server.port
        if self.tegrastats is not None:
            self.tegrastats.start()
        if self.cfg.interval_s > 0 and self.publisher is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._server is not None:
            self._server.stop()
            self._server = None
            self.metrics_port = 0
        if self.tegrastats is not None:
            self.tegrastats.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            if self.publisher is None:
                return
            try:
                self.publisher.publish_telemetry(self.build_message())
                self.sent += 1
            except Exception:
                log.exception("telemetry: publishing failed")

    def _spool(self) -> List[int]:
        if self.publisher is None:
            return [0, 0, 0]
        return [int(x) for x in self.publisher.spool_stats()]

    def _receipts(self) -> Dict[str, Any]:
        """The publisher's receipt figures (docs/edge-transport.md, *Storage receipts*)."""
        rx = getattr(self.publisher, "receipts", None)
        if rx is None:
            return {"receipts": 0, "frames_receipted": 0, "frames_resent": 0, "frames_refused_by_hub": 0,
                    "frames_awaiting_receipt": 0, "oldest_unreceipted_age_s": 0.0}
        return {"receipts": rx.received, "frames_receipted": rx.frames_receipted,
                "frames_resent": rx.frames_resent, "frames_refused_by_hub": rx.refused,
                "frames_awaiting_receipt": rx.book.awaiting, "oldest_unreceipted_age_s": rx.oldest_age_s()}

    def build_message(self) -> kestrel_pb2.Telemetry:
        snap = self.stats.snapshot()
        spool_bytes, spool_frames, evictions = self._spool()
        msg = kestrel_pb2.Telemetry(
            device_id=self.device_id, time_ms=now_ms(), fps=snap["fps"],
            latency_p50_ms=snap["latency_p50_ms"], latency_p95_ms=snap["latency_p95_ms"],
            queue_depth=snap["queue_depth"], spool_bytes=spool_bytes, spool_frames=spool_frames,
            spool_evictions=evictions, uptime_s=snap["uptime_s"],
            frames_processed=snap["frames_processed"], frames_sampled=snap["frames_sampled"],
            frames_dropped=snap["frames_dropped"], frames_corrupt=snap["frames_corrupt"],
            frames_low_confidence=snap["frames_low_confidence"], score_histogram=snap["score_histogram"],
            dead_letters=int(getattr(self.publisher, "dead_letters", 0) or 0), **self._receipts())
        for src in snap["sources"]:
            msg.sources.add(name=src["name"], fps=src["fps"], frames_captured=src["frames_captured"],
                            frames_processed=src["frames_processed"], frames_sampled=src["frames_sampled"],
                            frames_dropped=src["frames_dropped"], frames_corrupt=src["frames_corrupt"],
                            errors=src["errors"], queue_depth=src["queue_depth"], up=src["up"],
                            reconnects=src["reconnects"])
        if snap["model"] is not None:
            msg.model.CopyFrom(snap["model"])
        for reason, n in snap["desired_refused"].items():
            msg.desired_refused[reason] = n
        sample = self.tegrastats.latest() if self.tegrastats is not None else None
        if sample is not None:
            msg.jetson.CopyFrom(sample.to_proto())
        return msg

    def render_metrics(self) -> str:
        """The /metrics text as a scrape would get it (Prometheus text format 0.0.4)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")

    def collect(self) -> Iterator[Any]:
        """The metric families, read at scrape time (the custom collector of ``self.registry``)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name: str, help_text: str, value: float) -> Any:
            return GaugeMetricFamily(f"kestrel_edge_{name}", help_text, value=value)

        def counter(name: str, help_text: str, value: float) -> Any:  # exposed as {name}_total
            return CounterMetricFamily(f"kestrel_edge_{name}", help_text, value=value)

        snap = self.stats.snapshot()
        spool_bytes, spool_frames, evictions = self._spool()
        yield gauge("fps", "Inferences per second over the recent window.", snap["fps"])
        yield gauge("latency_p50_ms", "Median inference latency (recent window), ms.", snap["latency_p50_ms"])
        yield gauge("latency_p95_ms", "95th percentile inference latency, ms.", snap["latency_p95_ms"])
        yield gauge("queue_depth", "Frames waiting between capture and inference.", snap["queue_depth"])
        for key, help_text in (("frames_captured", "Frames read from the source."),
                               ("frames_processed", "Frames run through the model."),
                               ("frames_sampled", "Frames selected for the hub."),
                               ("frames_low_confidence", "Frames an uncertainty rule fired for."),
                               ("frames_dropped", "Frames dropped because inference fell behind."),
                               ("frames_corrupt", "Frames the source delivered unreadable.")):
            yield counter(key, help_text, snap[key])
        yield from source_families(snap["sources"])
        yield gauge("spool_bytes", "Bytes waiting in the spool.", spool_bytes)
        yield gauge("spool_frames", "Frames waiting in the spool.", spool_frames)
        yield counter("spool_evictions", "Frames evicted (oldest first) because the spool budget was full.",
                      evictions)
        yield gauge("uptime_seconds", "Seconds since the daemon started.", snap["uptime_s"])
        refused = CounterMetricFamily("kestrel_edge_desired_refused", "Desired-state messages refused (unsigned, "
                                      "bad signature, untrusted key, replayed, expired...).", labels=["reason"])
        counts = dict.fromkeys(desired.REASONS, 0)
        counts.update(snap["desired_refused"])
        for reason in sorted(counts):
            refused.add_metric([reason], counts[reason])
        yield refused
        pub = self.publisher
        if pub is not None:
            yield gauge("mqtt_connected", "1 while connected to the broker.", 1 if pub.connected else 0)
            yield counter("frames_acked", "Frames acknowledged by the broker.", int(getattr(pub, "frames_acked", 0)))
            yield counter("frames_oversize", "Frames refused: over max_payload_bytes.",
                          int(getattr(pub, "oversize_refused", 0)))
            yield counter("spool_corrupt", "Damaged spool records skipped.", int(pub.spool.corrupt))
            yield counter("frames_dead_lettered", "Frames set aside in spool/dead because the broker kept "
                          "refusing them.", int(getattr(pub, "dead_letters", 0)))
            yield counter("spool_write_failed", "Sampled frames lost because the spool could not be written "
                          "(disk full, read-only).", int(getattr(pub, "spool_write_failed", 0)))
            yield counter("telemetry_dropped", "Telemetry messages dropped offline.",
                          int(getattr(pub, "telemetry_dropped", 0)))
            rx = self._receipts()
            yield counter("receipts", "Storage receipts received from the hub.", int(rx["receipts"]))
            yield counter("frames_receipted", "Frames the hub said are durable in its store (then deleted from "
                          "the spool).", int(rx["frames_receipted"]))
            yield counter("frames_resent", "Frames published again because no receipt named them in time (or "
                          "the hub asked).", int(rx["frames_resent"]))
            yield counter("frames_refused_by_hub", "Frames set aside in spool/dead because the hub refused them "
                          "for good (or never receipted them while receipting others).",
                          int(rx["frames_refused_by_hub"]))
            yield gauge("frames_awaiting_receipt", "Frames the broker acknowledged that wait for the hub's "
                        "storage receipt.", int(rx["frames_awaiting_receipt"]))
            yield gauge("oldest_unreceipted_age_seconds", "Age of the oldest frame in the spool (not yet "
                        "receipted; 0 when the spool is empty).", float(rx["oldest_unreceipted_age_s"]))
        model = snap["model"]
        if model is not None:
            info = GaugeMetricFamily("kestrel_edge_model_info", "The running model (labels); always 1.",
                                     labels=["name", "sha256", "version"])
            info.add_metric([model.name, model.sha256, str(model.version)], 1)
            yield info
        if self.tegrastats is not None:
            yield gauge("tegra_up", "1 while tegrastats delivers fresh readings.",
                        1 if self.tegrastats.latest() is not None else 0)
            sample = self.tegrastats.latest()
            if sample is not None:
                yield from jetson_families(sample)
