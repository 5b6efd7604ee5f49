"""Camera sources: video file, USB (V4L2), RTSP, a test pattern; the GStreamer pipe is in edge.gstsource.

Every source is a :class:`FrameSource`: ``open()``, ``read() -> (ok, bgr, capture_time)`` and
``close()``; ``ok`` False means the source has ended (file end, ``max_frames`` reached, closed).
Live sources (``live`` True) never end on their own: a failed open, a read error or a stall
(no frame for ``stall_timeout_s``) closes the device and reopens it with exponential backoff
(``reconnect_initial_s`` doubling up to ``reconnect_max_s``), logging one line per kind of
failure rather than one per attempt; a reopened source counts as recovered only after delivering
frames for STABLE_AFTER_S. A GStreamer pipeline's end of stream (exit 0) ends the source; a failed
pipeline (non-zero exit) is reported with gst's ERROR line and reopened. Corrupt frames are counted
(``corrupt``) and skipped; in a file, ``max_corrupt_in_row`` undecodable frames in a row end it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Deque, List, Optional, Tuple

import cv2
import numpy as np

from edge.backoff import Backoff
from edge.config import SourceConfig
from edge.errors import SourceError
from edge.logonce import OncePerKind

log = logging.getLogger(__name__)

ReadResult = Tuple[bool, Optional[np.ndarray], float]
_END: ReadResult = (False, None, 0.0)
_POLL_S = 0.2  # how often a blocked pipe read checks for stop
STABLE_AFTER_S = 10.0  # a reopened live source counts as recovered after delivering frames this long


class EndOfStream(Exception):
    """A live source reached a normal end (a GStreamer pipeline's EOS): the source ends, no retry."""


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


def open_capture(uri: str, decode_threads: int, params: Optional[List[int]] = None) -> Any:
    """``cv2.VideoCapture`` through FFmpeg, decoding on at most ``decode_threads`` threads (0 = FFmpeg's
    choice). The same call opens the daemon's file and RTSP sources and the edge benchmark's video."""
    params = list(params or [])
    if decode_threads > 0 and hasattr(cv2, "CAP_PROP_N_THREADS"):
        params += [cv2.CAP_PROP_N_THREADS, decode_threads]
    try:
        return cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)
    except TypeError:  # pragma: no cover - OpenCV < 4.5.2 has no params argument
        return cv2.VideoCapture(uri, cv2.CAP_FFMPEG)


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
            return _END
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


def _valid(frame: Optional[np.ndarray]) -> bool:
    """An 8-bit BGR image: anything else (16-bit, grey, empty) is counted as a corrupt frame."""
    return (frame is not None and frame.ndim == 3 and frame.shape[2] == 3 and frame.size > 0
            and frame.dtype == np.uint8)


class FileSource(FrameSource):
    """A video file read with OpenCV; optionally looped and paced at the file's frame rate."""

    kind = "file"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.path = Path(cfg.uri)
        self._cap: Any = None
        self._frame_count = 0
        self._packets = 0  # read attempts since the start of the file (each consumes one frame)
        self._period = 0.0
        self._next_t = 0.0
        self._pool = FramePool()

    def open(self) -> FileSource:
        if not self.path.is_file():
            raise SourceError(f"video file {self.path} does not exist (source uri)")
        cap = open_capture(str(self.path), self.cfg.decode_threads)
        ok = cap.isOpened()
        first: Optional[np.ndarray] = None
        if ok:
            ok, first = cap.read()
            ok = bool(ok) and _valid(first)
        if not ok:
            cap.release()
            raise SourceError(f"cannot decode video file {self.path}: not a readable video "
                              "(check the file and that OpenCV's FFmpeg supports its codec)")
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        self._cap = cap
        self._frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._period = 1.0 / fps if self.cfg.realtime and fps > 0 else 0.0
        self._next_t = time.monotonic()
        return self

    def _read(self) -> ReadResult:
        """The next decodable frame. A frame that fails to decode is *pending* until a later frame
        decodes (then it was corrupt: counted and skipped) or the file ends (then it was the end).
        ``max_corrupt_in_row`` failures in a row before the known frame count ends the file."""
        if self._cap is None:
            self.open()
        pending = 0  # failed reads since the last good frame
        while not self._closed.is_set():
            ok, frame = self._pool.read(self._cap)
            self._packets += 1
            if ok and _valid(frame):
                if pending:
                    self._count_corrupt(pending)
                    pending = 0
                if self._period:
                    self._next_t += self._period
                    delay = self._next_t - time.monotonic()
                    if delay > 0:
                        self._closed.wait(delay)
                    else:
                        self._next_t = time.monotonic()
                return True, frame, time.time()
            if ok:  # decoded into something that is not a BGR image: certainly a corrupt frame
                self._count_corrupt(1)
                continue
            pending += 1
            before_end = self._frame_count > 0 and self._packets < self._frame_count
            if pending < self.cfg.max_corrupt_in_row and (before_end or self._frame_count <= 0):
                continue  # look further: a good frame after this one makes it a corrupt frame
            if before_end:
                self._count_corrupt(pending)
                log.error("source %s: %d unreadable frames in a row in %s (frame %d of %d); stopping",
                          self.name, pending, self.path, self._packets, self._frame_count)
                return _END
            if self.cfg.loop and self.frames > 0:
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                self._packets = 0
                pending = 0
                continue
            return _END
        return _END

    def _count_corrupt(self, n: int) -> None:
        if not self.corrupt:
            log.warning("source %s: skipping an undecodable frame in %s (frame %d); corrupt frames are "
                        "counted, not logged one by one", self.name, self.path, self._packets)
        self.corrupt += n

    def close(self) -> None:
        super().close()
        if self._cap is not None:
            self._cap.release()
            self._cap = None


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
                return _END
            except SourceError as exc:
                self._fail(getattr(exc, "kind", "stream lost"), str(exc))
                continue
            if self._closed.is_set():
                break
            if not ok:
                self._fail("stream lost", "no frame (ended, stalled or read error)")
                continue
            if not _valid(frame):
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
        return _END

    def close(self) -> None:
        super().close()
        if self._is_open:
            self._is_open = False
            self._close_device()


class OpenCVLiveSource(LiveSource):
    """USB (V4L2) or RTSP through cv2.VideoCapture."""

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self._cap: Any = None
        self._pool = FramePool()

    def _capture(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _open_device(self) -> None:
        cap = self._capture()
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.describe()}")
        self._cap = cap

    def _read_device(self) -> Tuple[bool, Optional[np.ndarray]]:
        start = time.monotonic()
        ok, frame = self._pool.read(self._cap)
        if not ok and time.monotonic() - start >= self.cfg.stall_timeout_s:
            raise SourceError(f"no frame for {self.cfg.stall_timeout_s:g}s (stalled)")
        return bool(ok), frame

    def _close_device(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class V4L2Source(OpenCVLiveSource):
    kind = "v4l2"

    def _capture(self) -> Any:
        uri = self.cfg.uri
        dev: Any = int(uri) if uri.isdigit() else uri
        cap = cv2.VideoCapture(dev, cv2.CAP_V4L2)
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
        if self.cfg.fps > 0:
            cap.set(cv2.CAP_PROP_FPS, self.cfg.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap


class RTSPSource(OpenCVLiveSource):
    """RTSP over TCP (``OPENCV_FFMPEG_CAPTURE_OPTIONS=rtsp_transport;tcp``) with open/read timeouts."""

    kind = "rtsp"

    def describe(self) -> str:
        # never log credentials embedded in the URL
        uri = self.cfg.uri
        if "@" in uri and "://" in uri:
            scheme, rest = uri.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return uri

    def _capture(self) -> Any:
        opts = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS", "")
        if "rtsp_transport" not in opts:
            opts = "|".join(x for x in (opts, "rtsp_transport;tcp") if x)
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = opts
        ms = int(self.cfg.stall_timeout_s * 1000)
        params: List[int] = []
        for name in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC"):
            if hasattr(cv2, name):
                params += [getattr(cv2, name), ms]
        return open_capture(self.cfg.uri, self.cfg.decode_threads, params)


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
                return _END
            if delay <= 0:
                self._next_t = time.monotonic()
        levels = self.cfg.pattern_brightness
        level = self.brightness if self.brightness is not None else levels[self._i % len(levels)]
        img = self.frame_at(self._i, float(level))
        self._i += 1
        return True, img, time.time()


def open_source(cfg: SourceConfig) -> FrameSource:
    """Build and open the source ``cfg`` describes. SourceError when a file is unreadable."""
    from edge.gstsource import GStreamerSource  # it builds on LiveSource: imported here, not at the top

    kinds = {"file": FileSource, "v4l2": V4L2Source, "rtsp": RTSPSource, "gstreamer": GStreamerSource,
             "testpattern": TestPatternSource}
    try:
        cls = kinds[cfg.kind]
    except KeyError:
        raise SourceError(f"unknown source kind {cfg.kind!r} ({', '.join(kinds)})") from None
    src: FrameSource = cls(cfg)
    return src.open()
