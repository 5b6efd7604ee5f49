"""A generated moving test pattern (no camera needed): for demos, tests and a first boot."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from edge.config import SourceConfig
from edge.sources.base import END, FrameSource, ReadResult


class TestPatternSource(FrameSource):
    """A moving pattern whose mean brightness cycles through ``pattern_brightness``.

    ``brightness`` may also be set at run time (tests use it to make low/high-confidence frames).
    Paced at ``fps`` (then it behaves as a live source); ``fps = 0`` delivers as fast as asked.
    """

    kind = "testpattern"
    __test__ = False  # not a pytest class

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.live = cfg.fps > 0
        self.brightness: Optional[float] = None
        self._period = 1.0 / cfg.fps if cfg.fps > 0 else 0.0
        self._next_t = time.monotonic()
        x = np.arange(cfg.width, dtype=np.float32)
        self._x = x
        self._i = 0

    def frame_at(self, i: int, level: float) -> np.ndarray:
        w, h = self.cfg.width, self.cfg.height
        amp = min(level, 1.0 - level, 0.15) * 255.0
        # a zero-mean moving wave, plus a moving light/dark bar pair: the mean stays ~level
        wave = amp * np.sin((self._x + 7.0 * i) * (2 * np.pi / max(16.0, w / 4.0)))
        row = np.clip(level * 255.0 + wave, 0, 255).astype(np.uint8)
        img = np.empty((h, w, 3), np.uint8)
        img[:] = row[None, :, None]
        if h >= 8:
            bar = (i * 5) % (h - 4)
            img[bar:bar + 2] = np.clip(level * 255.0 + amp, 0, 255)
            img[bar + 2:bar + 4] = np.clip(level * 255.0 - amp, 0, 255)
        return img

    def _read(self) -> ReadResult:
        if self._period:
            self._next_t += self._period
            delay = self._next_t - time.monotonic()
            if delay > 0 and self._closed.wait(delay):
                return END
            if delay <= 0:
                self._next_t = time.monotonic()
        levels = self.cfg.pattern_brightness
        level = self.brightness if self.brightness is not None else levels[self._i % len(levels)]
        img = self.frame_at(self._i, float(level))
        self._i += 1
        return True, img, time.time()
