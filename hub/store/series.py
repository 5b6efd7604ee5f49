"""The bounded telemetry history behind the dashboard's charts (docs/adr/0017-telemetry-series.md).

Devices send cumulative counters (frames inferred, sampled, low confidence, a top-1 score histogram)
and gauges (fps, latency p50/p95, spool) every few seconds. The store keeps one point per device and
minute: the newest message of that minute (a later message replaces an earlier one, an older one
never replaces a newer one). Rates come from differences between a device's consecutive points,
so a lost telemetry message (QoS 0) loses no counts: the next point carries them. Points older than
``[store] telemetry_retention_h`` are pruned by the hub.

The ingest makes one point per telemetry message (hub/ingest/parse.py) and writes them with
``Store.apply_batch``, in the same write as the device records.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

MINUTE_MS = 60_000


@dataclasses.dataclass
class SeriesPoint:
    device_id: str
    minute_ms: int                      # start of the minute (epoch ms); the key with device_id
    time_ms: int                        # the message's time (device clock, never after the hub received it)
    model_name: str = ""
    model_version: int = 0
    fps: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    spool_frames: int = 0
    dead_letters: int = 0
    uptime_s: float = 0.0               # a smaller uptime than the point before = the daemon restarted
    frames_processed: int = 0           # counters since the daemon started
    frames_sampled: int = 0
    frames_low_confidence: int = 0
    score_histogram: List[int] = dataclasses.field(default_factory=list)

    def to_doc(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> SeriesPoint:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


def _int(v: Any) -> int:
    """protobuf's JSON form writes 64-bit integers as strings."""
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def _float(v: Any) -> float:
    try:
        return float(v or 0.0)
    except (TypeError, ValueError):
        return 0.0


def point_from_telemetry(device_id: str, tele: Mapping[str, Any], seen_ms: Optional[int] = None) -> Optional[
        SeriesPoint]:
    """The series point of one telemetry message (as the ingest stores it in ``last_telemetry``: the
    message's JSON form); None when it has no time. ``seen_ms``: when the hub heard the device (a
    device clock running ahead must not put points in the future)."""
    t = _int(tele.get("time_ms"))
    if seen_ms:
        t = min(t, int(seen_ms)) if t else int(seen_ms)
    if t <= 0:
        return None
    model = tele.get("model") or {}
    return SeriesPoint(
        device_id=device_id, minute_ms=t - t % MINUTE_MS, time_ms=t,
        model_name=str(model.get("name", "")), model_version=_int(model.get("version")),
        fps=_float(tele.get("fps")), latency_p50_ms=_float(tele.get("latency_p50_ms")),
        latency_p95_ms=_float(tele.get("latency_p95_ms")), spool_frames=_int(tele.get("spool_frames")),
        dead_letters=_int(tele.get("dead_letters")), uptime_s=_float(tele.get("uptime_s")),
        frames_processed=_int(tele.get("frames_processed")), frames_sampled=_int(tele.get("frames_sampled")),
        frames_low_confidence=_int(tele.get("frames_low_confidence")),
        score_histogram=[_int(v) for v in tele.get("score_histogram") or []])
