"""The GStreamer source: ``gst-launch-1.0 <pipeline> ! ... ! fdsink`` read as raw BGR frames on a pipe,
so CSI cameras (``nvarguscamerasrc``) work with a pip-installed OpenCV that has no GStreamer. A live
source like RTSP (edge.sources.base.LiveSource: reopened with backoff, stall timeout)."""

from __future__ import annotations

import collections
import os
import select
import shlex
import shutil
import subprocess
import threading
import time
from typing import Deque, List, Optional, Tuple

import numpy as np

from edge.config import SourceConfig
from edge.errors import SourceError
from edge.sources.base import POLL_S, EndOfStream, LiveSource
from proto.backoff import HISTORY

_EXIT_WAIT_S = 3.0  # how long a gst-launch-1.0 whose output ended gets to exit and flush its stderr


class GStreamerSource(LiveSource):
    """``gst-launch-1.0 -q <pipeline> ! videoconvert ! videoscale ! video/x-raw,format=BGR,... ! fdsink``.

    Raw BGR frames arrive on a pipe (exact W*H*3-byte reads), so CSI cameras (``nvarguscamerasrc``)
    work with pip OpenCV builds that lack GStreamer support.
    """

    kind = "gstreamer"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.exe = shutil.which("gst-launch-1.0") or "gst-launch-1.0"
        self._proc: Optional[subprocess.Popen] = None
        self._frame_bytes = cfg.width * cfg.height * 3
        self._stderr: Deque[str] = collections.deque(maxlen=20)
        self._stderr_thread: Optional[threading.Thread] = None
        self.exit_codes: Deque[int] = collections.deque(maxlen=HISTORY)  # of the latest gst-launch-1.0 runs

    def command(self) -> List[str]:
        caps = f"video/x-raw,format=BGR,width={self.cfg.width},height={self.cfg.height}"
        return [self.exe, "-q"] + shlex.split(self.cfg.uri) + [
            "!", "videoconvert", "!", "videoscale", "!", caps, "!", "fdsink", "fd=1"]

    def _open_device(self) -> None:
        try:
            proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, bufsize=0)
        except OSError as exc:
            raise SourceError(f"cannot start gst-launch-1.0: {exc.strerror or exc} "
                              "(install gstreamer1.0-tools)") from exc
        self._proc = proc
        self._stderr.clear()
        self._stderr_thread = threading.Thread(target=self._drain_stderr, args=(proc,), daemon=True,
                                               name=f"gst-stderr-{self.name}")
        self._stderr_thread.start()

    def _drain_stderr(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._stderr.append(line.decode(errors="replace").rstrip())

    def _read_device(self) -> Tuple[bool, Optional[np.ndarray]]:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return False, None
        buf = bytearray(self._frame_bytes)
        view = memoryview(buf)
        got = 0
        fd = proc.stdout.fileno()
        start = time.monotonic()
        while got < self._frame_bytes:
            if self._closed.is_set():
                return False, None
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if not ready:
                if time.monotonic() - start > self.cfg.stall_timeout_s:
                    raise SourceError(f"no frame for {self.cfg.stall_timeout_s:g}s (stalled)")
                continue
            n = os.readv(fd, [view[got:]])
            if not n:
                self._ended(proc, got)
            got += n
        return True, np.frombuffer(buf, np.uint8).reshape(self.cfg.height, self.cfg.width, 3)

    def _ended(self, proc: subprocess.Popen, partial: int) -> None:
        """The pipe closed: EOS (exit 0) ends the source; anything else is a failure to retry."""
        try:
            code = proc.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            raise SourceError("gst-launch-1.0 closed its output but did not exit") from None
        if self._stderr_thread is not None:
            self._stderr_thread.join(_EXIT_WAIT_S)
        self.exit_codes.append(code)
        if code == 0:
            extra = f" ({partial} bytes of an incomplete last frame dropped)" if partial else ""
            raise EndOfStream(f"the GStreamer pipeline reached its end of stream{extra}")
        lines = list(self._stderr)
        errors = [ln for ln in lines if ln.startswith("ERROR")] or [ln for ln in lines if ln.strip()]
        detail = errors[0] if errors else "no error message"
        exc = SourceError(f"gst-launch-1.0 failed (exit code {code}): {detail}")
        exc.kind = "pipeline failed"  # type: ignore[attr-defined]
        raise exc

    def _close_device(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
