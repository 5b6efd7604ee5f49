"""Runtime statistics of the edge daemon, published as MQTT telemetry and Prometheus metrics.

* :class:`Stats` is fed by the capture/inference threads (thread-safe) and summarises: fps over the
  last ``fps_window_s`` seconds, latency p50/p95 (nearest rank, milliseconds) over the last
  ``latency_window`` inferences, counters and uptime, and (since the start) how many frames were
  low confidence and a histogram of every inferred frame's top-1 score (SCORE_BINS equal bins over
  [0, 1]): the hub charts both per model version. The clock is injectable for tests.
* :class:`TelemetryService` publishes a ``kestrel_pb2.Telemetry`` every ``[telemetry] interval_s``
  on ``topics.telemetry(device_id)`` (QoS 0) and serves ``/metrics`` (names in
  docs/edge-transport.md).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional

from edge.config import TelemetryConfig
from edge.telemetry.metrics import MetricsServer, TextBuilder
from proto import kestrel_pb2
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


class Stats:
    def __init__(self, clock: Clock = time.monotonic, fps_window_s: float = FPS_WINDOW_S,
                 latency_window: int = LATENCY_WINDOW) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self.fps_window_s = fps_window_s
        self._times: Deque[float] = collections.deque()
        self._latencies: Deque[float] = collections.deque(maxlen=latency_window)
        self.captured = 0
        self.processed = 0
        self.dropped = 0
        self.corrupt = 0
        self.sampled = 0
        self.low_confidence = 0
        self.score_histogram = [0] * SCORE_BINS
        self.queue_depth = 0
        self.model: Optional[kestrel_pb2.ModelRef] = None

    def frame_captured(self) -> None:
        with self._lock:
            self.captured += 1

    def frame_dropped(self, n: int = 1) -> None:
        with self._lock:
            self.dropped += n

    def frame_corrupt(self) -> None:
        with self._lock:
            self.corrupt += 1

    def frame_sampled(self) -> None:
        with self._lock:
            self.sampled += 1

    def inference(self, latency_s: float, top: Optional[float] = None, low_confidence: bool = False) -> None:
        """One inferred frame: its latency, its top-1 score (None: unknown) and whether an uncertainty
        rule fired for it."""
        now = self._clock()
        with self._lock:
            self.processed += 1
            if top is not None and top == top:  # NaN never reaches here from the pipeline; be safe
                self.score_histogram[min(SCORE_BINS - 1, max(0, int(top * SCORE_BINS)))] += 1
            if low_confidence:
                self.low_confidence += 1
            self._latencies.append(float(latency_s))
            self._times.append(now)
            self._trim(now)

    def set_queue_depth(self, n: int) -> None:
        with self._lock:
            self.queue_depth = int(n)

    def set_model(self, ref: kestrel_pb2.ModelRef) -> None:
        copy = kestrel_pb2.ModelRef()
        copy.CopyFrom(ref)
        with self._lock:
            self.model = copy

    def _trim(self, now: float) -> None:
        cutoff = now - self.fps_window_s
        while self._times and self._times[0] <= cutoff:
            self._times.popleft()

    def snapshot(self) -> Dict[str, Any]:
        """fps (inferences per second over the recent window), latency_p50_ms/latency_p95_ms (over the
        recent bounded window), counters, queue_depth, uptime_s and model (a ModelRef or None)."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            uptime = max(0.0, now - self._start)
            span = min(self.fps_window_s, uptime)
            fps = len(self._times) / span if span > 0 else 0.0
            lat = sorted(self._latencies)
            model = None
            if self.model is not None:
                model = kestrel_pb2.ModelRef()
                model.CopyFrom(self.model)
            return {
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
            }


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
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.sent = 0

    def start(self) -> None:
        if self._want_port != 0:
            bind_port = 0 if self._want_port == EPHEMERAL_PORT else self._want_port
            self._server = MetricsServer(self.cfg.metrics_bind, bind_port, self.render_metrics)
            self._server.start()
            self.metrics_port = self._server.port
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
            dead_letters=int(getattr(self.publisher, "dead_letters", 0) or 0))
        if snap["model"] is not None:
            msg.model.CopyFrom(snap["model"])
        return msg

    def render_metrics(self) -> str:
        snap = self.stats.snapshot()
        spool_bytes, spool_frames, evictions = self._spool()
        t = TextBuilder()
        t.add("kestrel_edge_fps", "gauge", "Inferences per second over the recent window.", snap["fps"])
        t.add("kestrel_edge_latency_p50_ms", "gauge", "Median inference latency (recent window), ms.",
              snap["latency_p50_ms"])
        t.add("kestrel_edge_latency_p95_ms", "gauge", "95th percentile inference latency, ms.",
              snap["latency_p95_ms"])
        t.add("kestrel_edge_queue_depth", "gauge", "Frames waiting between capture and inference.",
              snap["queue_depth"])
        for key, help_text in (("frames_captured", "Frames read from the source."),
                               ("frames_processed", "Frames run through the model."),
                               ("frames_sampled", "Frames selected for the hub."),
                               ("frames_low_confidence", "Frames an uncertainty rule fired for."),
                               ("frames_dropped", "Frames dropped because inference fell behind."),
                               ("frames_corrupt", "Frames the source delivered unreadable.")):
            t.add(f"kestrel_edge_{key}_total", "counter", help_text, snap[key])
        t.add("kestrel_edge_spool_bytes", "gauge", "Bytes waiting in the spool.", spool_bytes)
        t.add("kestrel_edge_spool_frames", "gauge", "Frames waiting in the spool.", spool_frames)
        t.add("kestrel_edge_spool_evictions_total", "counter",
              "Frames evicted (oldest first) because the spool budget was full.", evictions)
        t.add("kestrel_edge_uptime_seconds", "gauge", "Seconds since the daemon started.", snap["uptime_s"])
        pub = self.publisher
        if pub is not None:
            t.add("kestrel_edge_mqtt_connected", "gauge", "1 while connected to the broker.",
                  1 if pub.connected else 0)
            t.add("kestrel_edge_frames_acked_total", "counter", "Frames acknowledged by the broker.",
                  int(getattr(pub, "frames_acked", 0)))
            t.add("kestrel_edge_frames_oversize_total", "counter", "Frames refused: over max_payload_bytes.",
                  int(getattr(pub, "oversize_refused", 0)))
            t.add("kestrel_edge_spool_corrupt_total", "counter", "Damaged spool records skipped.",
                  int(pub.spool.corrupt))
            t.add("kestrel_edge_frames_dead_lettered_total", "counter",
                  "Frames set aside in spool/dead because the broker kept refusing them.",
                  int(getattr(pub, "dead_letters", 0)))
            t.add("kestrel_edge_spool_write_failed_total", "counter",
                  "Sampled frames lost because the spool could not be written (disk full, read-only).",
                  int(getattr(pub, "spool_write_failed", 0)))
            t.add("kestrel_edge_telemetry_dropped_total", "counter", "Telemetry messages dropped offline.",
                  int(getattr(pub, "telemetry_dropped", 0)))
        model = snap["model"]
        if model is not None:
            t.add("kestrel_edge_model_info", "gauge", "The running model (labels); always 1.", 1,
                  {"name": model.name, "version": str(model.version), "sha256": model.sha256})
        return t.render()

