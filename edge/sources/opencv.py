"""OpenCV (FFmpeg) sources: a video file, a USB camera (V4L2), RTSP."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import cv2
import numpy as np

from edge.config import SourceConfig
from edge.errors import SourceError
from edge.sources.base import END, FramePool, FrameSource, LiveSource, ReadResult, valid_frame

log = logging.getLogger(__name__)


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
            ok = bool(ok) and valid_frame(first)
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
            if ok and valid_frame(frame):
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
                return END
            if self.cfg.loop and self.frames > 0:
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                self._packets = 0
                pending = 0
                continue
            return END
        return END

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
