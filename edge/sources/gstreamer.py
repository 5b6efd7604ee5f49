"""The GStreamer source: ``gst-launch-1.0 <pipeline> ! ... ! fdsink`` read as raw BGR frames on a pipe,
so CSI cameras (``nvarguscamerasrc``) work with a pip-installed OpenCV that has no GStreamer. A live
source like RTSP (edge.sources.base.LiveSource: reopened with backoff, stall timeout).

``[source] preset`` names a ready pipeline instead of writing one (``preset_pipeline``): ``csi`` (a
Jetson's CSI camera through Argus, converted out of NVMM memory by the VIC with ``nvvidconv``), ``usb``
(a V4L2 camera's raw frames, converted by ``nvvidconv`` where the plugin exists, else by the
``videoconvert`` the daemon appends anyway), ``usb-mjpeg`` (decoded by ``nvv4l2decoder`` where it
exists, else ``jpegdec``) and ``test`` (``videotestsrc``). Which elements exist is asked of
``gst-inspect-1.0 --exists`` once per element.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import select
import shlex
import shutil
import subprocess
import threading
import time
from fractions import Fraction
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

from edge.config import SourceConfig
from edge.errors import SourceError
from edge.sources.base import POLL_S, EndOfStream, LiveSource
from proto.backoff import HISTORY

_EXIT_WAIT_S = 3.0  # how long a gst-launch-1.0 whose output ended gets to exit and flush its stderr
_INSPECT_TIMEOUT_S = 20.0

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def gst_element_exists(name: str) -> bool:
    """Whether this machine's GStreamer has the element (``gst-inspect-1.0 --exists NAME``)."""
    exe = shutil.which("gst-inspect-1.0")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "--exists", name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=_INSPECT_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _framerate(fps: float) -> str:
    if fps <= 0:
        return ""
    f = Fraction(fps).limit_denominator(1001)
    return f",framerate={f.numerator}/{f.denominator}"


def preset_pipeline(cfg: SourceConfig, has: Callable[[str], bool] = gst_element_exists) -> str:
    """The pipeline ``[source] preset`` stands for (up to the caps the daemon appends its sink to)."""
    size = f"width={cfg.width},height={cfg.height}{_framerate(cfg.fps)}"
    device = cfg.uri or "/dev/video0"
    if cfg.preset == "csi":
        return (f"nvarguscamerasrc sensor-id={cfg.uri or 0} ! video/x-raw(memory:NVMM),{size} ! "
                "nvvidconv ! video/x-raw,format=BGRx")
    if cfg.preset == "usb":
        raw = f"v4l2src device={device} ! video/x-raw,{size}"
        return f"{raw} ! nvvidconv ! video/x-raw,format=BGRx" if has("nvvidconv") else raw
    if cfg.preset == "usb-mjpeg":
        jpeg = f"v4l2src device={device} ! image/jpeg,{size}"
        if has("nvv4l2decoder") and has("nvvidconv"):
            return f"{jpeg} ! nvv4l2decoder mjpeg=1 ! nvvidconv ! video/x-raw,format=BGRx"
        return f"{jpeg} ! jpegdec"
    if cfg.preset == "test":
        return f"videotestsrc is-live=true pattern=ball ! video/x-raw,{size}"
    raise SourceError(f"unknown GStreamer preset {cfg.preset!r}")  # the config refuses it first


def preset_problems(cfg: SourceConfig, has: Callable[[str], bool] = gst_element_exists) -> List[str]:
    """What this machine lacks for ``[source] preset`` (empty = nothing missing, or no preset)."""
    needs: Dict[str, List[Tuple[str, ...]]] = {"csi": [("nvarguscamerasrc",), ("nvvidconv",)], "usb": [("v4l2src",)],
             "usb-mjpeg": [("v4l2src",), ("nvv4l2decoder", "jpegdec")], "test": [("videotestsrc",)]}
    where = ("JetPack's GStreamer plugins: a Jetson" if cfg.preset == "csi"
             else "apt install gstreamer1.0-plugins-good")
    return [f"source.preset {cfg.preset} needs the GStreamer element {' or '.join(group)} ({where})"
            for group in needs.get(cfg.preset, []) if not any(has(e) for e in group)]


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
        self.pipeline = preset_pipeline(cfg) if cfg.preset else cfg.uri
        if cfg.preset:
            log.info("source %s: GStreamer preset %s: %s", self.name, cfg.preset, self.pipeline)

    def command(self) -> List[str]:
        caps = f"video/x-raw,format=BGR,width={self.cfg.width},height={self.cfg.height}"
        return [self.exe, "-q"] + shlex.split(self.pipeline) + [
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
