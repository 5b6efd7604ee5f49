"""Trial health watch: after a switch, decide commit or roll back from what the inference loop sees.

Before a switch the watch keeps a rolling window of the running model (latency, top score). At the
switch the service fixes the **judging threshold**: the confidence threshold in force *before* the
switch (the configured one, else the previous model's bundle default), so a new bundle cannot pick
the threshold its own trial is judged by. The baseline (p95 latency, low-confidence rate at that
threshold) is taken then. During the trial only the trial model's frames count (by ModelRef);
once both the frame count and the time window have passed it compares:

* invoke errors (non-finite scores count) >= max_errors              -> roll back (every frame)
* latency p95  >  max_latency_ms (absolute, baseline or not)          -> roll back
* latency p95  >  max_latency_ratio x max(baseline p95, floor)        -> roll back (with a baseline)
* low-confidence rate > baseline rate + max_low_conf_rate             -> roll back (with a baseline)
* low-confidence rate > max_low_conf_abs                              -> roll back (no baseline)
* otherwise                                                           -> commit

``check_progress`` catches a hung model: frames keep being captured but none is inferred for
``stall_s`` seconds -> roll back.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

BASELINE_WINDOW = 300
MIN_BASELINE = 5
DEFAULT_THRESHOLD = 0.6  # the sampler's default for a bare .tflite (edge.pipeline.sampler)


@dataclasses.dataclass
class TrialCriteria:
    frames: int = 200
    seconds: float = 60.0
    max_latency_ratio: float = 3.0
    max_low_conf_rate: float = 0.5
    max_errors: int = 3
    latency_floor_s: float = 0.002  # baseline p95 below this counts as this (sub-ms timings are noise)
    max_latency_s: float = 1.0  # absolute p95 limit (0 = none)
    max_low_conf_abs: float = 0.9  # without a baseline
    stall_s: float = 30.0


def p95(values: List[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


Verdict = Tuple[str, str]  # ("commit" | "rollback", reason)


def top_score(result: Any) -> Optional[float]:
    """The result's top score (``InferenceResult.top``, computed once by the pipeline), None when it has
    none; NaN marks non-finite scores (the pipeline turns those into error results itself)."""
    top = getattr(result, "top", None)
    return None if top is None else float(top)


class HealthWatch:
    def __init__(self, criteria: TrialCriteria, clock: Callable[[], float] = time.monotonic) -> None:
        self.criteria = criteria
        self._clock = clock
        self._lock = threading.Lock()
        self._base: Deque[Tuple[float, Optional[float], bool]] = collections.deque(maxlen=BASELINE_WINDOW)
        self._trial_ref: Any = None
        self._trial_started = 0.0
        self._baseline: Optional[Dict[str, float]] = None
        self._threshold = DEFAULT_THRESHOLD
        self._lat: List[float] = []
        self._low = 0
        self._errors = 0
        self._verdict: Optional[Verdict] = None
        self._progress: Optional[Tuple[int, int, float]] = None  # (captured, processed, since)
        self.stalled = False

    # ---- baseline ----
    def baseline(self, threshold: float = DEFAULT_THRESHOLD) -> Optional[Dict[str, float]]:
        """The running model's figures so far at ``threshold``, or None when too few frames were seen."""
        with self._lock:
            if len(self._base) < MIN_BASELINE:
                return None
            lats = [x[0] for x in self._base]
            low = sum(1 for x in self._base if _is_low(x[1], x[2], threshold)) / len(self._base)
            return {"p95_latency_s": p95(lats), "low_conf_rate": low, "frames": float(len(self._base)),
                    "threshold": float(threshold)}

    # ---- trial ----
    def begin_trial(self, ref: Any, baseline: Optional[Dict[str, float]],
                    threshold: Optional[float] = None) -> None:
        with self._lock:
            self._trial_ref = ref
            self._baseline = baseline
            self._base.clear()  # the previous model's window was summarised into ``baseline``
            self._threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
            self._trial_started = self._clock()
            self._lat = []
            self._low = 0
            self._errors = 0
            self._verdict = None
            self._progress = None
            self.stalled = False

    def end_trial(self, keep_baseline: bool = False) -> None:
        """Stop watching. The baseline window is cleared (it belongs to the model that runs from now
        on) unless ``keep_baseline``: after a commit verdict it already holds only that model's frames."""
        with self._lock:
            self._trial_ref = None
            if not keep_baseline:
                self._base.clear()

    def trial_frames(self) -> int:
        with self._lock:
            return len(self._lat)

    def observe(self, result: Any) -> Optional[Verdict]:
        """Feed one inference result; return a verdict once (then None until the next trial)."""
        err = getattr(result, "error", None)
        lat = float(getattr(result, "latency_s", 0.0) or 0.0)
        top = top_score(result)
        if not err and top is not None and not math.isfinite(top):
            err = "non-finite scores (NaN or infinity)"
        flag = bool(getattr(result, "low_confidence", False))
        ref = getattr(result, "model_ref", None)
        with self._lock:
            if self._trial_ref is None:
                if not err:
                    self._base.append((lat, top, flag))
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
            self._low += int(_is_low(top, flag, self._threshold))
            return self._maybe_decide()

    def check_time(self) -> Optional[Verdict]:
        """Called periodically: a trial whose frames are done decides when its time window ends."""
        with self._lock:
            if self._trial_ref is None or self._verdict is not None:
                return None
            return self._maybe_decide()

    def check_progress(self, captured: int, processed: int) -> Optional[Verdict]:
        """Called periodically with the pipeline's counters: a trial model that stops inferring while
        frames keep arriving (a hung invoke) is rolled back after ``stall_s``."""
        with self._lock:
            if self._trial_ref is None or self._verdict is not None:
                self._progress = None
                return None
            now = self._clock()
            if self._progress is None or processed != self._progress[1]:
                self._progress = (captured, processed, now)
                return None
            c0, _p0, since = self._progress
            if captured > c0 and now - since >= self.criteria.stall_s:
                self.stalled = True
                self._verdict = ("rollback", f"inference stalled: no frame inferred for {now - since:.0f} s "
                                             f"while {captured - c0} frames arrived (a hung model)")
                return self._verdict
            if captured == c0:
                self._progress = (captured, processed, now)  # no frames at all: the camera, not the model
            return None

    def _maybe_decide(self) -> Optional[Verdict]:
        c = self.criteria
        n = len(self._lat)
        if n < c.frames or self._clock() - self._trial_started < c.seconds:
            return None
        base = self._baseline
        if n:
            trial_p95 = p95(self._lat)
            if c.max_latency_s > 0 and trial_p95 > c.max_latency_s:
                self._verdict = ("rollback", f"latency p95 {trial_p95 * 1000:.1f} ms is over the absolute "
                                             f"limit {c.max_latency_s * 1000:.0f} ms")
                return self._verdict
            rate = self._low / n
            if base:
                base_p95 = float(base.get("p95_latency_s", 0.0))
                if base_p95 > 0 and trial_p95 > c.max_latency_ratio * max(base_p95, c.latency_floor_s):
                    self._verdict = ("rollback", f"latency p95 {trial_p95 * 1000:.1f} ms is more than "
                                                 f"{c.max_latency_ratio:g}x the previous model's "
                                                 f"{base_p95 * 1000:.1f} ms")
                    return self._verdict
                base_rate = float(base.get("low_conf_rate", 0.0))
                if rate - base_rate > c.max_low_conf_rate:
                    self._verdict = ("rollback", f"low-confidence rate {rate:.0%} vs {base_rate:.0%} before "
                                                 f"the switch (threshold {self._threshold:g}, allowed rise "
                                                 f"{c.max_low_conf_rate:.0%})")
                    return self._verdict
            elif rate > c.max_low_conf_abs:
                self._verdict = ("rollback", f"low-confidence rate {rate:.0%} (threshold {self._threshold:g}) "
                                             f"is over {c.max_low_conf_abs:.0%}, with no baseline of a "
                                             "previous model to compare with")
                return self._verdict
        self._verdict = ("commit", f"healthy over {n} frames")
        # From now on the trial model is simply the running model: its frames build the next baseline.
        self._trial_ref = None
        self._base.clear()
        return self._verdict


def _is_low(top: Optional[float], flag: bool, threshold: float) -> bool:
    """Low confidence at the judging threshold (from the scores; the pipeline's flag when none)."""
    if top is None:
        return flag
    return top < threshold
