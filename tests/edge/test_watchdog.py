"""systemd's notify protocol, seen from systemd's side: a real `kestrel-edge run` process whose
$NOTIFY_SOCKET is a unix datagram socket this test reads (what systemd does for Type=notify).

READY once the pipeline runs, WATCHDOG at half of $WATCHDOG_USEC while frames flow, none once the
camera stalls (its gst-launch-1.0 is stopped with SIGSTOP), again when it resumes, STOPPING on SIGTERM;
and a device that waits for its first model pings on purpose (it must not be restarted).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from edge.telemetry.watchdog import PING_FRACTION, watchdog_interval_s
from tests.edge.test_daemon import daemon_cmd, env, write_toml
from tests.helpers.wait import wait_for

WATCHDOG_USEC = 300_000  # systemd's WatchdogSec=0.3s: the daemon pings every 0.15 s
PERIOD_S = WATCHDOG_USEC / 1e6 * PING_FRACTION
STALL_GAP_S = 8 * PERIOD_S  # no ping for this long: the daemon noticed the stall (it pings every PERIOD_S)


class NotifySocket:
    """The socket systemd listens on for a Type=notify service; keeps every datagram with its arrival time."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kn-", dir="/tmp")  # AF_UNIX paths are short: not pytest's tmp
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: List[Tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def since(self, t: float, what: str) -> List[float]:
        """Arrival times of the messages after ``t`` that carry the line ``what`` (e.g. "WATCHDOG=1")."""
        with self._lock:
            return [at for at, text in self.messages if at > t and what in text.splitlines()]

    def first(self, what: str) -> Optional[Tuple[float, str]]:
        with self._lock:
            return next(((at, text) for at, text in self.messages if what in text.splitlines()), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify_socket():  # noqa: ANN201
    s = NotifySocket()
    yield s
    s.close()


def start(toml: Path, cwd: Path, sock: NotifySocket) -> subprocess.Popen:
    e = dict(env(), NOTIFY_SOCKET=sock.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    e.pop("WATCHDOG_PID", None)
    return subprocess.Popen(daemon_cmd(toml), env=e, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def children_named(pid: int, comm: str) -> List[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and name == comm:
            out.append(int(d.name))
    return out


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return err


def test_ready_then_watchdog_only_while_frames_flow_then_stopping(tmp_path, models_dir, notify_socket, gst):  # noqa: ANN001
    src = ('[source]\nkind = "gstreamer"\nname = "cam"\nwidth = 64\nheight = 48\nstall_timeout_s = 120\n'
           'uri = "videotestsrc is-live=true ! video/x-raw,framerate=30/1"')
    toml = write_toml(tmp_path, "cam-wd", 1, src, models_dir)
    toml.write_text(toml.read_text().replace('host = "127.0.0.1"', 'host = ""'))  # no broker needed here
    proc = start(toml, tmp_path, notify_socket)
    camera: Optional[int] = None
    try:
        def running() -> bool:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            return notify_socket.first("READY=1") is not None

        wait_for(running, 60, what="READY=1 from the daemon")
        ready_at, ready = notify_socket.first("READY=1")  # type: ignore[misc]
        assert "STATUS=running brightness_int8" in ready and "on cam (gstreamer)" in ready
        wait_for(lambda: len(notify_socket.since(ready_at, "WATCHDOG=1")) >= 5, 30, what="periodic WATCHDOG=1")

        cams = children_named(proc.pid, "gst-launch-1.0")
        assert len(cams) == 1, cams
        camera = cams[0]
        os.kill(camera, signal.SIGSTOP)  # the camera delivers nothing more (the pipe still holds a few frames)
        stalled_at = time.monotonic()

        def quiet() -> bool:  # a gap of STALL_GAP_S since the last ping: the daemon stopped pinging
            pings = notify_socket.since(stalled_at, "WATCHDOG=1")
            last = pings[-1] if pings else stalled_at
            return time.monotonic() - last >= STALL_GAP_S

        wait_for(quiet, 30, what=f"no WATCHDOG=1 for {STALL_GAP_S:.1f}s once the camera stalled")
        assert proc.poll() is None  # under systemd, WatchdogSec would now restart it; here it waits
        resumed_at = time.monotonic()
        os.kill(camera, signal.SIGCONT)
        camera = None
        wait_for(lambda: len(notify_socket.since(resumed_at, "WATCHDOG=1")) >= 2, 30,
                 what="WATCHDOG=1 again once frames flow")
        stopping_at = time.monotonic()
        err = stop(proc)
    finally:
        if camera is not None:
            os.kill(camera, signal.SIGCONT)
        stop(proc)
    assert proc.returncode == 0, err[-2000:]
    assert notify_socket.since(stopping_at, "STOPPING=1"), notify_socket.messages[-5:]
    assert "watchdog: no frame captured or inferred" in err  # one line says why systemd will restart it


def test_waiting_for_a_first_model_keeps_pinging(tmp_path, broker, notify_socket):  # noqa: ANN001
    src = '[source]\nkind = "rtsp"\nuri = "rtsp://127.0.0.1:1/never-opened"'
    toml = write_toml(tmp_path, "cam-wd-fresh", broker.port, src, tmp_path, model='path = ""',
                      extra=f'[update]\nhub_grpc = "127.0.0.1:1"\ntrust_dir = "{tmp_path}"')
    toml.write_text(toml.read_text().replace("enabled = false", "enabled = true"))
    proc = start(toml, tmp_path, notify_socket)
    try:
        def ready() -> Optional[Tuple[float, str]]:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            return notify_socket.first("READY=1")

        ready_at, text = wait_for(ready, 60, what="READY=1 while waiting for the hub")
        assert "STATUS=waiting for the hub to deploy a first model (group default)" in text
        wait_for(lambda: len(notify_socket.since(ready_at, "WATCHDOG=1")) >= 5, 30,
                 what="WATCHDOG=1 with no pipeline (idle on purpose)")
        stopping_at = time.monotonic()
        err = stop(proc)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-2000:]
    assert notify_socket.since(stopping_at, "STOPPING=1")
    assert "watchdog: no frame" not in err


def test_watchdog_interval_is_systemds() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 42) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None  # not ours
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval_s({}, 42) is None
