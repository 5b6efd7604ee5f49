"""Which frames go to the hub: uncertainty strategies, rate limits, near-duplicate suppression.

A frame is *low confidence* when any configured strategy fires:

* ``confidence``: the top score is below ``confidence_threshold`` (unset in the config: the running
  model's bundle ``default_threshold``, see :meth:`Sampler.follow_model_default`, else 0.6);
* ``margin``: top-1 minus top-2 is below ``margin_threshold``;
* ``entropy``: the normalized entropy of the scores (0..1) is above ``entropy_threshold``.

A low-confidence frame is then *sent* unless a rolling rate limit (per minute/hour/day) is full
or its 64-bit perceptual hash is within ``dedup_distance`` of a frame sent in the last
``dedup_window_s`` seconds. Every decision is counted, so telemetry can say why frames were not sent.

Several cameras (``decide(..., source=name)``): the rate limits are the *device's* budget, shared by its
sources (they bound the device's uplink and what the hub stores of it; the pipeline takes frames
round-robin, so the budget goes to the sources in turn while it lasts), and the near-duplicate memory is
*per source* (a duplicate is the same scene seen again by the same camera; two cameras looking at
similar scenes are both worth a look).

The rate limits hold across restarts (a daemon in a crash loop must not exceed its daily budget):
with ``state_path`` every sent frame appends its wall-clock time to that file (one line, not fsynced:
the page cache survives a daemon crash, a power cut may lose the newest lines); it is read back at
start and compacted (atomically) when it grows to twice what the limits need. A torn last line (power
cut) is ignored and the file rewritten at once. Saved times in the future (the wall clock went back,
or is unset after a power cut without RTC) keep their spacing, the newest counting as now.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

from edge.config import SamplerConfig
from edge.inference.perceptual import dhash, popcount
from edge.inference.uncertainty import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    confidence_fires,
    entropy_fires,
    margin_fires,
    normalized_entropy,
    top_two,
)
from proto import atomic, kestrel_pb2

log = logging.getLogger(__name__)

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
__all__ = ["DEFAULT_CONFIDENCE_THRESHOLD", "Decision", "DuplicateFilter", "RateLimiter", "Sampler",
           "normalized_entropy", "uncertainty_reasons"]


def uncertainty_reasons(scores: np.ndarray, cfg: SamplerConfig, top: Optional[float] = None) -> List[int]:
    """The SampleReason values whose strategy fires for these scores (empty = confident).
    ``top``: the highest score when the caller knows it already (the pipeline does). The rules
    themselves are edge.inference.uncertainty's (the trainer sweeps the same functions)."""
    s = np.asarray(scores).reshape(-1)
    reasons: List[int] = []
    if s.size == 0:
        return reasons
    strategies = cfg.strategies  # runs for every frame on the inference thread: few numpy calls
    if "margin" in strategies and s.size > 1:
        top, second = top_two(s)
    else:
        top, second = (float(s.max()) if top is None else top), 0.0
    threshold = DEFAULT_CONFIDENCE_THRESHOLD if cfg.confidence_threshold is None else cfg.confidence_threshold
    if "confidence" in strategies and confidence_fires(top, threshold):
        reasons.append(kestrel_pb2.LOW_CONFIDENCE)
    if "margin" in strategies and margin_fires(top - second, cfg.margin_threshold):
        reasons.append(kestrel_pb2.LOW_MARGIN)
    if "entropy" in strategies and entropy_fires(normalized_entropy(s), cfg.entropy_threshold):
        reasons.append(kestrel_pb2.HIGH_ENTROPY)
    return reasons


@dataclasses.dataclass
class Decision:
    low_confidence: bool
    reasons: List[int]
    send: bool
    skipped: str = ""   # "", "rate_limited" or "duplicate"
    phash: Optional[int] = None


class RateLimiter:
    """Rolling-window limits: at most N events in any trailing minute, hour and day."""

    def __init__(self, per_minute: int, per_hour: int, per_day: int,
                 clock: Callable[[], float] = time.monotonic, state_path: Optional[Path] = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.limits = [(w, n) for w, n in ((MINUTE, per_minute), (HOUR, per_hour), (DAY, per_day)) if n > 0]
        self.clock = clock
        self.wall_clock = wall_clock
        longest = max((n for _, n in self.limits), default=0)
        self._events: Deque[float] = collections.deque(maxlen=longest or 1)
        self.state_path = state_path if self.limits else None
        self._state_lines = 0
        self._persist_failed = False
        if self.state_path is not None:
            self._load()

    # -- persistence (wall-clock times on disk, the injected monotonic clock in memory) -----------
    def _load(self) -> None:
        assert self.state_path is not None
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("sampler: cannot read the rate-limit state %s (%s); starting with empty windows",
                        self.state_path, exc.strerror or exc)
            return
        walls = []
        for line in text.splitlines():
            try:
                walls.append(float(line))
            except ValueError:
                continue  # a torn last line
        now_wall, now = self.wall_clock(), self.clock()
        horizon = max(w for w, _ in self.limits)
        compact = bool(text) and not text.endswith("\n")  # a torn last line: the next append must not join it
        newest = max(walls, default=now_wall)
        if newest > now_wall:
            # the wall clock went back (or is unset: 1970 after a power cut without RTC). Keep the
            # spacing of the saved times and let the newest count as now: counting them all as now
            # would fill every window for up to a day. Rewritten at once in this clock's terms.
            log.warning("sampler: the rate-limit state %s holds times up to %.0f s in the future (the wall "
                        "clock went back or is not set); counting the newest as now", self.state_path,
                        newest - now_wall)
            walls = [w - (newest - now_wall) for w in walls]
            compact = True
        for w in sorted(walls):
            age = now_wall - w
            if 0 <= age < horizon:
                self._events.append(now - age)
        self._state_lines = len(walls)
        if compact:
            try:
                self._compact()
            except OSError as exc:
                log.warning("sampler: cannot rewrite the rate-limit state %s: %s", self.state_path,
                            exc.strerror or exc)
        if self._events:
            log.info("sampler: %d frames sent in the last %s count against the rate limits",
                     len(self._events), "day" if horizon >= DAY else "hour" if horizon >= HOUR else "minute")

    def _compact(self) -> None:
        """Rewrite the state file with the events in the windows (atomic; not fsynced: a statistic that
        the page cache keeps across a daemon crash, see :meth:`_persist`)."""
        assert self.state_path is not None
        now_wall, now = self.wall_clock(), self.clock()
        atomic.write_text(self.state_path, "".join(f"{now_wall - (now - e):.3f}\n" for e in self._events),
                          fsync=False)
        self._state_lines = len(self._events)

    def _persist(self, t: float) -> None:
        path = self.state_path
        if path is None:
            return
        wall = self.wall_clock() - (self.clock() - t)
        try:
            if self._state_lines + 1 > 2 * (self._events.maxlen or 1):
                self._compact()  # holds the event just recorded
            else:
                fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0),
                             0o644)
                try:
                    # no fsync: this runs on the inference thread, and a write in the page cache
                    # survives any crash of the daemon (the crash loop this guards against); only a
                    # power cut may lose the newest lines, i.e. allow a few more frames after it
                    os.write(fd, f"{wall:.3f}\n".encode())
                finally:
                    os.close(fd)
                self._state_lines += 1
            self._persist_failed = False
        except OSError as exc:  # a statistic on a full disk must not stop frames from going out
            if not self._persist_failed:
                log.warning("sampler: cannot persist the rate-limit state %s: %s", path, exc.strerror or exc)
            self._persist_failed = True

    def allow(self) -> bool:
        """True (and record the event) when every window has room."""
        if not self.has_room():
            return False
        self.record()
        return True

    def record(self) -> None:
        if self.limits:
            t = self.clock()
            self._events.append(t)
            self._persist(t)

    def has_room(self) -> bool:
        """True when every window has room (nothing recorded)."""
        if not self.limits:
            return True
        now = self.clock()
        events = self._events  # oldest first, in clock order
        n = len(events)
        # a window is full when its limit-th most recent event is still inside it
        return all(n < limit or now - events[-limit] >= window for window, limit in self.limits)


class DuplicateFilter:
    """Remembers hashes of sent frames; a look-alike within the window is a duplicate."""

    def __init__(self, distance: int, window_s: float, history: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.distance = distance
        self.window_s = window_s
        self.clock = clock
        self._recent: Deque[Tuple[float, int]] = collections.deque(maxlen=max(1, history))

    @property
    def enabled(self) -> bool:
        return self.distance >= 0

    def is_duplicate(self, h: int) -> bool:
        now = self.clock()
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        limit = self.distance
        return any(popcount(h ^ old) <= limit for _, old in self._recent)

    def remember(self, h: int) -> None:
        self._recent.append((self.clock(), h))

    def forget(self) -> None:
        self._recent.clear()


class Sampler:
    """``decide(scores, bgr) -> Decision``; thread-safe; counters in ``counters()``."""

    def __init__(self, cfg: SamplerConfig, clock: Callable[[], float] = time.monotonic,
                 hasher: Callable[[np.ndarray], int] = dhash, state_path: Optional[Path] = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        """``state_path``: where the rate-limit windows persist (None = in memory only)."""
        self.cfg = cfg
        self.rate = RateLimiter(cfg.max_per_minute, cfg.max_per_hour, cfg.max_per_day, clock,
                                state_path=state_path, wall_clock=wall_clock)
        self._clock = clock
        self._dedup: Dict[str, DuplicateFilter] = {}  # per source
        self.dedup = self.dedup_for("")  # the one of a single (unnamed) source
        self.hasher = hasher
        self._explicit = cfg.confidence_threshold is not None
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {"seen": 0, "low_confidence": 0, "sampled": 0,
                                        "rate_limited": 0, "duplicate": 0}

    def dedup_for(self, source: str) -> DuplicateFilter:
        """The near-duplicate memory of ``source`` (created on first use)."""
        f = self._dedup.get(source)
        if f is None:
            cfg = self.cfg
            f = self._dedup[source] = DuplicateFilter(cfg.dedup_distance, cfg.dedup_window_s, cfg.dedup_history,
                                                      self._clock)
        return f

    @property
    def confidence_threshold(self) -> float:
        """The threshold in use (config value, else the model's default, else 0.6)."""
        value = self.cfg.confidence_threshold
        return DEFAULT_CONFIDENCE_THRESHOLD if value is None else float(value)

    @property
    def threshold_from_config(self) -> bool:
        """True when ``[sampler] confidence_threshold`` was set: model defaults are then ignored."""
        return self._explicit

    def set_confidence_threshold(self, value: float) -> None:
        """Use ``value`` from now on (an explicit setting: model defaults no longer apply)."""
        self._explicit = True
        self.cfg = dataclasses.replace(self.cfg, confidence_threshold=float(value))

    def follow_model_default(self, default: Optional[float]) -> float:
        """A new model is running: adopt its bundle's ``default_threshold`` (None = bare .tflite -> 0.6)
        unless the config set the threshold. Returns the threshold in use."""
        if not self._explicit:
            value = DEFAULT_CONFIDENCE_THRESHOLD if default is None else float(default)
            self.cfg = dataclasses.replace(self.cfg, confidence_threshold=value)
        return self.confidence_threshold

    def model_changed(self) -> None:
        """A different model runs from now on: what it is unsure about is news even for a scene the previous
        model's frames already showed, so the near-duplicate memory starts empty (rate limits carry on)."""
        with self._lock:
            for f in self._dedup.values():
                f.forget()

    def decide(self, scores: np.ndarray, bgr: Optional[np.ndarray] = None,
               extra_reasons: Optional[List[int]] = None, thumbnail: Optional[np.ndarray] = None,
               top: Optional[float] = None, source: str = "") -> Decision:
        """``thumbnail``: a small version of ``bgr`` to hash instead of it (the model's resized input);
        ``top``: the highest of ``scores`` when the caller computed it already; ``source``: the camera
        (its own near-duplicate memory; the rate limits are shared)."""
        reasons = uncertainty_reasons(scores, self.cfg, top)
        for r in extra_reasons or []:
            if r not in reasons:
                reasons.append(r)
        with self._lock:
            self._counts["seen"] += 1
            if not reasons:
                return Decision(False, [], False)
            self._counts["low_confidence"] += 1
            # the rate limit is checked first: no hashing while it is full (saves CPU on the device)
            if not self.rate.has_room():
                self._counts["rate_limited"] += 1
                return Decision(True, reasons, False, "rate_limited")
            h: Optional[int] = None
            image = thumbnail if thumbnail is not None else bgr
            dedup = self.dedup if not source else self.dedup_for(source)
            if dedup.enabled and image is not None:
                h = self.hasher(image)
                if dedup.is_duplicate(h):
                    self._counts["duplicate"] += 1
                    return Decision(True, reasons, False, "duplicate", h)
                dedup.remember(h)
            self.rate.record()
            self._counts["sampled"] += 1
            return Decision(True, reasons, True, "", h)

    def counters(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._counts)
