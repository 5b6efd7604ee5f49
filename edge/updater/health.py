"""Trial health watch: after a switch, decide commit or roll back from what the inference loop sees.

Before a switch the watch keeps a rolling baseline of the running model (latency p95, low-confidence
rate). During the trial it counts the trial model's frames only (by ModelRef) and, once both the
frame count and the time window have passed, compares:

* invoke errors       >= max_errors                           -> roll back (checked on every frame)
* latency p95         >  max_latency_ratio x baseline p95     -> roll back (baseline >= latency_floor_s)
* low-confidence rate >  baseline rate + max_low_conf_rate    -> roll back
* otherwise                                                   -> commit
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

BASELINE_WINDOW = 300
MIN_BASELINE = 5


@dataclasses.dataclass
class TrialCriteria:
    frames: int = 200
    seconds: float = 60.0
    max_latency_ratio: float = 3.0
    max_low_conf_rate: float = 0.5
    max_errors: int = 3
    latency_floor_s: float = 0.002  # baseline p95 below this counts as this (sub-ms timings are noise)


def p95(values: List[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


Verdict = Tuple[str, str]  # ("commit" | "rollback", reason)


class HealthWatch:
    def __init__(self, criteria: TrialCriteria, clock: Callable[[], float] = time.monotonic) -> None:
        self.criteria = criteria
        self._clock = clock
        self._lock = threading.Lock()
        self._base: Deque[Tuple[float, bool]] = collections.deque(maxlen=BASELINE_WINDOW)
        self._trial_ref: Any = None
        self._trial_started = 0.0
        self._baseline: Optional[Dict[str, float]] = None
        self._lat: List[float] = []
        self._low = 0
        self._errors = 0
        self._verdict: Optional[Verdict] = None

    # ---- baseline ----
    def baseline(self) -> Optional[Dict[str, float]]:
        """The running model's figures so far, or None when too few frames were seen."""
        with self._lock:
            if len(self._base) < MIN_BASELINE:
                return None
            lats = [x[0] for x in self._base]
            low = sum(1 for x in self._base if x[1]) / len(self._base)
            return {"p95_latency_s": p95(lats), "low_conf_rate": low, "frames": float(len(self._base))}

    # ---- trial ----
    @property
    def in_trial(self) -> bool:
        return self._trial_ref is not None

    def begin_trial(self, ref: Any, baseline: Optional[Dict[str, float]]) -> None:
        with self._lock:
            self._trial_ref = ref
            self._baseline = baseline
            self._trial_started = self._clock()
            self._lat = []
            self._low = 0
            self._errors = 0
            self._verdict = None

    def end_trial(self) -> None:
        with self._lock:
            self._trial_ref = None
            self._base.clear()  # the baseline belongs to the model that runs from now on

    def observe(self, result: Any) -> Optional[Verdict]:
        """Feed one inference result; return a verdict once (then None until the next trial)."""
        err = getattr(result, "error", None)
        lat = float(getattr(result, "latency_s", 0.0) or 0.0)
        low = bool(getattr(result, "low_confidence", False))
        ref = getattr(result, "model_ref", None)
        with self._lock:
            if self._trial_ref is None:
                if not err:
                    self._base.append((lat, low))
                return None
            if self._verdict is not None or (ref is not None and ref != self._trial_ref):
                return None  # a frame of the previous model still in flight, or decided already
            if err:
                self._errors += 1
                if self._errors >= self.criteria.max_errors:
                    why = f"{self._errors} invoke errors during the trial (last: {err})"
                    self._verdict = ("rollback", why)
                    return self._verdict
                return None
            self._lat.append(lat)
            self._low += int(low)
            return self._maybe_decide()

    def check_time(self) -> Optional[Verdict]:
        """Called periodically: a trial whose frames are done decides when its time window ends."""
        with self._lock:
            if self._trial_ref is None or self._verdict is not None:
                return None
            return self._maybe_decide()

    def _maybe_decide(self) -> Optional[Verdict]:
        c = self.criteria
        n = len(self._lat)
        if n < c.frames or self._clock() - self._trial_started < c.seconds:
            return None
        base = self._baseline
        if n and base:
            trial_p95 = p95(self._lat)
            base_p95 = float(base.get("p95_latency_s", 0.0))
            if base_p95 > 0 and trial_p95 > c.max_latency_ratio * max(base_p95, c.latency_floor_s):
                self._verdict = ("rollback", f"latency p95 {trial_p95 * 1000:.1f} ms is more than "
                                             f"{c.max_latency_ratio:g}x the previous model's "
                                             f"{base_p95 * 1000:.1f} ms")
                return self._verdict
            rate = self._low / n
            base_rate = float(base.get("low_conf_rate", 0.0))
            if rate - base_rate > c.max_low_conf_rate:
                self._verdict = ("rollback", f"low-confidence rate {rate:.0%} vs {base_rate:.0%} before the "
                                             f"switch (allowed rise {c.max_low_conf_rate:.0%})")
                return self._verdict
        self._verdict = ("commit", f"healthy over {n} frames")
        return self._verdict

    def figures(self) -> Dict[str, float]:
        with self._lock:
            n = len(self._lat)
            return {"frames": float(n), "errors": float(self._errors),
                    "p95_latency_s": p95(self._lat), "low_conf_rate": (self._low / n) if n else 0.0}
