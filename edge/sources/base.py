"""What every camera source is: FrameSource (open/read/close, frame counts, max_frames), LiveSource
(reopened with backoff, stall timeout) and FramePool (decode buffers reused). The kinds are in
edge.sources.opencv, edge.sources.pattern and edge.sources.gstreamer; edge.sources.open_source
builds one from its config."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Deque, List, Optional, Tuple

import numpy as np

from edge.config import SourceConfig
from edge.errors import EndOfStream, SourceError
from edge.logonce import OncePerKind
from proto.backoff import Backoff

log = logging.getLogger(__name__)

ReadResult = Tuple[bool, Optional[np.ndarray], float]
END: ReadResult = (False, None, 0.0)
POLL_S = 0.2  # how often a blocked pipe read checks for stop
STABLE_AFTER_S = 10.0  # a reopened live source counts as recovered after delivering frames this long



class FramePool:
    """Camera frame buffers that OpenCV decodes into again once nothing refers to them any more.

    A new camera-size array per frame costs page faults: the allocator hands freed frames back to
    the OS when several are released at once (the queue drains) and the next frames fault their
    pages in again, a few percent of the capture thread. A buffer is free when only the pool holds
    it: the frame queue, the inference thread, a sampled frame waiting for JPEG encoding and any
    numpy view of it each hold a reference (CPython reference counts, calibrated at start). At most
    ``limit`` buffers are kept; beyond that frames are allocated as before.
    """

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._bufs: List[np.ndarray] = []
        self.reused = 0
        probe = [np.empty(1, np.uint8)]
        self._free_refs = self._refs(probe)  # what "only the pool holds it" looks like here

    @staticmethod
    def _refs(bufs: List[np.ndarray]) -> int:
        for buf in bufs:
            return sys.getrefcount(buf)
        return 0

    def take(self) -> Optional[np.ndarray]:
        """A buffer nothing else refers to, or None."""
        free = self._free_refs
        for buf in self._bufs:
            if sys.getrefcount(buf) == free:
                return buf
        return None

    def read(self, cap: Any) -> Tuple[bool, Optional[np.ndarray]]:
        """``cap.read()`` into a free buffer when there is one (OpenCV reuses it when the size fits)."""
        buf = self.take()
        if buf is None:
            ok, frame = cap.read()
            if ok and frame is not None and len(self._bufs) < self.limit:
                self._bufs.append(frame)
            return ok, frame
        ok, frame = cap.read(buf)
        if frame is buf:
            self.reused += 1
        elif ok and frame is not None:  # another size (the stream changed): keep the new one instead
            self._bufs[self._bufs.index(buf)] = frame
        return ok, frame

class FrameSource:
    """Base class: counts frames, enforces ``max_frames``, wraps the kind-specific ``_read``."""

    live = False
    kind = "base"

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.frames = 0      # frames delivered
        self.corrupt = 0     # undecodable/empty frames skipped
        self._closed = threading.Event()

    def open(self) -> FrameSource:
        return self

    def read(self) -> ReadResult:
        if self._closed.is_set() or (self.cfg.max_frames and self.frames >= self.cfg.max_frames):
            return END
        ok, frame, t = self._read()
        if ok:
            self.frames += 1
        return ok, frame, t

    def _read(self) -> ReadResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()

    def request_stop(self) -> None:
        """Thread-safe: make a blocked or waiting ``read`` return the end soon; call close() after."""
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __enter__(self) -> FrameSource:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def valid_frame(frame: Optional[np.ndarray]) -> bool:
    """An 8-bit BGR image: anything else (16-bit, grey, empty) is counted as a corrupt frame."""
    return (frame is not None and frame.ndim == 3 and frame.shape[2] == 3 and frame.size > 0
            and frame.dtype == np.uint8)

class LiveSource(FrameSource):
    """A live source: reopen with exponential backoff on failures and stalls, never end by itself."""

    live = True

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.attempts = 0                # open attempts
        self.failures = 0                # failed opens + lost streams
        self._backoff = Backoff(cfg.reconnect_initial_s, cfg.reconnect_max_s, STABLE_AFTER_S)
        self.backoffs: Deque[float] = self._backoff.history  # the latest waits before a reopen
        self._once = OncePerKind(log)  # failures by kind, logged once per kind until frames come again
        self._is_open = False

    # kind-specific
    def _open_device(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_device(self) -> Tuple[bool, Optional[np.ndarray]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_device(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.cfg.uri

    @property
    def is_open(self) -> bool:
        """The device is open (False between a failure and the next successful open)."""
        return self._is_open

    def _fail(self, kind: str, detail: str) -> None:
        self.failures += 1
        self._once.log(kind, logging.WARNING, "source %s (%s): %s: %s; retrying with backoff (logged once per kind)",
                       self.name, self.describe(), kind, detail)
        if self._is_open:
            self._close_device()
            self._is_open = False
        self._closed.wait(self._backoff.next())

    def open(self) -> LiveSource:
        """Try once; a failure is not fatal (``read`` keeps retrying)."""
        if not self._is_open and not self._closed.is_set():
            self._try_open()
        return self

    def _try_open(self) -> bool:
        self.attempts += 1
        try:
            self._open_device()
        except SourceError as exc:
            self._fail("open failed", str(exc))
            return False
        self._is_open = True
        self._backoff.up()
        return True

    def _read(self) -> ReadResult:
        corrupt_in_row = 0
        while not self._closed.is_set():
            if not self._is_open and not self._try_open():
                continue
            try:
                ok, frame = self._read_device()
            except EndOfStream as exc:
                log.info("source %s: %s; the source ends", self.name, exc)
                return END
            except SourceError as exc:
                self._fail(getattr(exc, "kind", "stream lost"), str(exc))
                continue
            if self._closed.is_set():
                break
            if not ok:
                self._fail("stream lost", "no frame (ended, stalled or read error)")
                continue
            if not valid_frame(frame):
                self.corrupt += 1
                corrupt_in_row += 1
                if corrupt_in_row >= self.cfg.max_corrupt_in_row:
                    self._fail("corrupt frames", f"{corrupt_in_row} undecodable frames in a row")
                    corrupt_in_row = 0
                continue
            # recovered once up for STABLE_AFTER_S (stable() starts the backoff over): only then, so a
            # pipeline that fails after every few frames keeps backing off and logs once
            if self.failures and self._backoff.stable() and self._once.logged():
                log.info("source %s: receiving frames again", self.name)
                self._once.reset()
            return True, frame, time.time()
        return END

    def close(self) -> None:
        super().close()
        if self._is_open:
            self._is_open = False
            self._close_device()
