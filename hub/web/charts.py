"""The charts' numbers from the telemetry series (hub/store/series.py): per model version over time the
low-confidence rate and the top-1 score distribution, and the fleet's fps and inference latency.

Counters are differences between a device's consecutive points (a daemon restart, seen as a smaller
uptime or a counter going down, starts over from the new point's own counts), attributed to the model
version of the later point, summed per time bucket. A bucket with no inferred frames has no rate
(None: a gap in the line, not a zero).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from hub.store.base import Store
from hub.store.series import MINUTE_MS, SeriesPoint

RANGES_H = (1, 6, 24, 48, 168)
BUCKET_MIN = {1: 1, 6: 5, 24: 20, 48: 30, 168: 120}  # minutes per bucket for each range


@dataclasses.dataclass
class Charts:
    hours: int
    bucket_ms: int
    buckets: List[int]                                   # bucket start times (ms)
    versions: List[str]                                  # "name vN", newest first
    low_conf_rate: Dict[str, List[Optional[float]]]      # version -> per bucket
    score_p25: Dict[str, List[Optional[float]]]
    score_p50: Dict[str, List[Optional[float]]]
    score_p75: Dict[str, List[Optional[float]]]
    score_hist: Dict[str, List[float]]                   # version -> fraction of frames per score bin (window)
    frames: Dict[str, int]                               # version -> frames inferred in the window
    fleet_fps: List[Optional[float]]
    latency_p50: List[Optional[float]]                   # mean over the devices' points
    latency_p95: List[Optional[float]]                   # worst device
    devices: int

    def to_json(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def _version(p: SeriesPoint) -> str:
    return f"{p.model_name or '?'} v{p.model_version}"


def _quantile(hist: Sequence[float], q: float) -> Optional[float]:
    """The q-quantile of a histogram over [0, 1] with equal bins (linear within the bin)."""
    total = float(sum(hist))
    if total <= 0:
        return None
    width = 1.0 / len(hist)
    seen = 0.0
    for i, n in enumerate(hist):
        if n and seen + n >= q * total:
            return min(1.0, (i + (q * total - seen) / n) * width)
        seen += n
    return 1.0  # pragma: no cover - only with rounding at q = 1


def _deltas(points: Sequence[SeriesPoint]) -> List[Tuple[SeriesPoint, int, int, List[int]]]:
    """(point, frames inferred, low-confidence frames, score histogram) since each device's previous point."""
    out = []
    prev: Optional[SeriesPoint] = None
    for p in points:  # ordered by device, then minute
        if prev is None or prev.device_id != p.device_id:
            prev = p
            continue
        restart = p.uptime_s < prev.uptime_s or p.frames_processed < prev.frames_processed \
            or p.frames_low_confidence < prev.frames_low_confidence
        if restart:
            hist = list(p.score_histogram)
            out.append((p, p.frames_processed, p.frames_low_confidence, hist))
        else:
            same = len(p.score_histogram) == len(prev.score_histogram)
            hist = [a - b for a, b in zip(p.score_histogram, prev.score_histogram)] if same else []
            out.append((p, p.frames_processed - prev.frames_processed,
                        p.frames_low_confidence - prev.frames_low_confidence,
                        [max(0, h) for h in hist]))
        prev = p
    return out


def window(now_ms: int, hours: int) -> Tuple[int, int, int]:
    """(start, end, bucket_ms) of the range of ``hours`` (one of RANGES_H) ending with the current bucket."""
    bucket_ms = BUCKET_MIN[hours] * MINUTE_MS
    end = now_ms - now_ms % bucket_ms + bucket_ms
    return end - hours * 3600 * 1000, end, bucket_ms


def load(store: Store, now_ms: int, hours: int) -> Charts:
    """The charts of the last ``hours`` (6 unless one of RANGES_H), from the store's series (one bucket
    before the window too: the baseline of each device's first difference)."""
    hours = hours if hours in RANGES_H else 6
    start, end, bucket_ms = window(now_ms, hours)
    return compute(store.list_series(start - bucket_ms, end), now_ms, hours)


def compute(points: Sequence[SeriesPoint], now_ms: int, hours: int) -> Charts:
    hours = hours if hours in RANGES_H else 6
    start, end, bucket_ms = window(now_ms, hours)
    buckets = list(range(start, end, bucket_ms))
    n = len(buckets)

    def index(ms: int) -> Optional[int]:
        i = (ms - start) // bucket_ms
        return int(i) if 0 <= i < n else None

    processed: Dict[str, List[int]] = {}
    low: Dict[str, List[int]] = {}
    hists: Dict[str, List[List[int]]] = {}
    latest: Dict[str, int] = {}
    for p, d_proc, d_low, hist in _deltas(points):
        i = index(p.minute_ms)
        if i is None:
            continue
        v = _version(p)
        latest[v] = max(latest.get(v, 0), p.model_version)
        processed.setdefault(v, [0] * n)[i] += max(0, d_proc)
        low.setdefault(v, [0] * n)[i] += max(0, d_low)
        if hist:
            per = hists.setdefault(v, [[] for _ in range(n)])
            per[i] = [a + b for a, b in zip(per[i], hist)] if per[i] and len(per[i]) == len(hist) else list(hist)
    versions = sorted(processed, key=lambda v: (v.rsplit(" v", 1)[0], -latest.get(v, 0)))
    fps_sum: List[Dict[str, List[float]]] = [{} for _ in range(n)]
    p50: List[List[float]] = [[] for _ in range(n)]
    p95: List[List[float]] = [[] for _ in range(n)]
    devices = set()
    for p in points:
        i = index(p.minute_ms)
        if i is None:
            continue
        devices.add(p.device_id)
        fps_sum[i].setdefault(p.device_id, []).append(p.fps)
        if p.latency_p50_ms > 0:
            p50[i].append(p.latency_p50_ms)
        if p.latency_p95_ms > 0:
            p95[i].append(p.latency_p95_ms)

    def quantiles(v: str, q: float) -> List[Optional[float]]:
        return [_quantile(h, q) if h else None for h in hists.get(v, [[] for _ in range(n)])]

    window_hist: Dict[str, List[float]] = {}
    for v, per in hists.items():
        width = max((len(h) for h in per), default=0)
        total = [sum(h[b] for h in per if len(h) == width) for b in range(width)]
        s = float(sum(total))
        window_hist[v] = [t / s for t in total] if s else []
    return Charts(
        hours=hours, bucket_ms=bucket_ms, buckets=buckets, versions=versions,
        low_conf_rate={v: [lo / pr if pr else None for lo, pr in zip(low[v], processed[v])] for v in versions},
        score_p25={v: quantiles(v, 0.25) for v in versions}, score_p50={v: quantiles(v, 0.5) for v in versions},
        score_p75={v: quantiles(v, 0.75) for v in versions}, score_hist=window_hist,
        frames={v: sum(processed[v]) for v in versions},
        fleet_fps=[sum(sum(x) / len(x) for x in b.values()) if b else None for b in fps_sum],
        latency_p50=[sum(b) / len(b) if b else None for b in p50],
        latency_p95=[max(b) if b else None for b in p95], devices=len(devices))
