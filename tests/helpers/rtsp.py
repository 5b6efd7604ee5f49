"""A real RTSP camera for tests (gst-rtsp-server under Debian's Python), stoppable and restartable on one port."""

from __future__ import annotations

import queue
import subprocess
import threading
from pathlib import Path
from typing import Optional

from tests.helpers.broker import free_port

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).with_name("rtsp_server.py")
APT = "apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-good"


def rtsp_server_missing() -> Optional[str]:
    """None when the RTSP test server can run here, else what to install."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                            "from gi.repository import GstRtspServer"], capture_output=True, timeout=30)
    return None if probe.returncode == 0 else f"the RTSP test server needs Debian's packages: {APT}"


class RtspCamera:
    """``start()``/``stop()`` keep the port, so a client can reconnect to a restarted camera."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self, timeout: float = 20.0) -> RtspCamera:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(SCRIPT), str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        proc = self.proc
        lines: queue.Queue[str] = queue.Queue()
        out = proc.stdout
        # "ready", or "" when the process ends; read on a thread so a hung server cannot hang the suite
        threading.Thread(target=lambda: lines.put(out.readline() if out else ""), daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"the RTSP test server did not say ready within {timeout:.0f}s") from None
        if line.strip() != "ready":
            err = proc.communicate(timeout=timeout)[1] if proc.poll() is not None else ""
            raise RuntimeError(f"the RTSP test server did not start: {line.strip()} {err[-500:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)  # raises TimeoutExpired if it did not exit
        self.proc = None
