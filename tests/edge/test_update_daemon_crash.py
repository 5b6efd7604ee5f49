"""Crash safety of the real daemon: ``kestrel-edge run`` (camera, MQTT, the updater) follows a
retained desired state from a real Mosquitto, fetches the bundle from a real gRPC registry, and is
SIGKILLed at every step of the update (``KESTREL_CRASH_AT``), including a trial that fails and rolls
back. Started again, it must boot a complete, verified slot (its files match its signed manifest),
old or new, never a mix; and the restarted daemon keeps running."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest

from edge.updater import state as st
from proto import kestrel_pb2
from tests.edge.test_updater import Device, _Registry, bundle, make_cfg
from tests.helpers.bundles import make_keypair
from tests.helpers.fleet import fleet_keypair, signed

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 90.0
BOOT_RE = re.compile(r"boot \w+: model (\S+) v(\d+) \(([0-9a-f]{12})")

# crash point -> (bundle deployed, version the restarted daemon must boot)
POINTS = {
    "DOWNLOADING": ("good", 1), "VERIFIED": ("good", 1), "STAGE_PARTIAL": ("good", 1), "STAGED": ("good", 1),
    "SELF_TEST": ("good", 1), "TRIAL": ("good", 1),
    "SWITCHED": ("good", 1),  # died during the trial: the next start rolls back (max_boot_attempts = 1)
    "COMMITTED": ("good", 2),
    "ROLLING_BACK": ("bad", 1), "ROLLBACK_SWITCHED": ("bad", 1),  # the trial failed; died mid-rollback
}


class Daemon:
    """One ``kestrel-edge run`` process; its log lines are collected by a reader thread."""

    def __init__(self, cfgp: Path, crash: str = "") -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        env.pop(st.CRASH_ENV, None)
        if crash:
            env[st.CRASH_ENV] = crash
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(cfgp)], cwd=str(ROOT),
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: List[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_line(self, rx: re.Pattern[str], timeout: float = TIMEOUT) -> re.Match[str]:
        with self._cv:
            ok = self._cv.wait_for(lambda: any(rx.search(x) for x in self.lines) or self.proc.poll() is not None,
                                   timeout)
            for x in self.lines:
                m = rx.search(x)
                if m:
                    return m
        raise AssertionError(f"no line matching {rx.pattern} (ended={ok}):\n" + "".join(self.lines[-30:]))

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()


@pytest.fixture
def rig(tmp_path, models_dir, broker):  # noqa: ANN001
    kp = make_keypair(tmp_path)
    v1 = bundle(models_dir, kp, 1)
    dev = Device(make_cfg(tmp_path, kp.pub_path))
    assert dev.install(v1) and dev.settle() == st.COMMITTED
    dev.close()
    bundles = {"good": bundle(models_dir, kp, 2), "bad": bundle(models_dir, kp, 2, model="uniform_int8")}
    return {"tmp": tmp_path, "kp": kp, "bundles": bundles, "broker": broker, "fleet": fleet_keypair(tmp_path)}


def _config(rig: Dict[str, Any], registry: str, device_id: str) -> Path:
    t = rig["tmp"]
    p = t / "edge.toml"
    p.write_text(
        f'[device]\nid = "{device_id}"\ndata_dir = "{t / "data"}"\n'
        '[source]\nkind = "testpattern"\nfps = 30.0\nwidth = 64\nheight = 48\npattern_brightness = [0.9]\n'
        '[model]\nthreads = 1\n'
        f'[mqtt]\nhost = "{rig["broker"].host}"\nport = {rig["broker"].port}\n'
        '[telemetry]\ninterval_s = 0.0\nmetrics_port = 0\n'
        f'[update]\ntrust_dir = "{rig["kp"].pub_path}"\nhub_grpc = "{registry}"\ntls = false\ntrial_frames = 10\n'
        f'trial_seconds = 0.0\nclock_slack_s = 0.0\nfleet_keys = ["{rig["fleet"].pub_path}"]\n')
    return p


def _publish_desired(rig: Dict[str, Any], device_id: str, data: bytes) -> None:
    import paho.mqtt.client as mqtt

    from proto import topics

    msg = kestrel_pb2.DesiredState(model_name="brightness", version=2, sha256=hashlib.sha256(data).hexdigest(),
                                   size=len(data), issued_ms=1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(rig["broker"].host, rig["broker"].port)
    c.loop_start()
    try:
        topic = topics.device_desired(device_id)
        c.publish(topic, signed(topic, msg, rig["fleet"]) if data else b"", qos=1, retain=True).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def _check_active_slot(data_dir: Path) -> None:
    """The active slot is complete: every file matches its signed manifest's hash (which version it
    holds depends on how far the restarted daemon got with the update before it was stopped)."""
    active = (data_dir / "slots" / "active").read_text().strip()
    slot = data_dir / "slots" / active
    man = json.loads((slot / "manifest.json").read_text())
    assert man["files"], "the manifest lists no files"
    for name, ent in man["files"].items():
        assert hashlib.sha256((slot / name).read_bytes()).hexdigest() == ent["sha256"], name


@pytest.mark.parametrize("point", list(POINTS))
def test_sigkill_real_daemon_at_every_update_step(rig, point):  # noqa: ANN001
    which, expect = POINTS[point]
    data = rig["bundles"][which]
    reg = _Registry({("brightness", 2): data})
    device_id = f"crash-{point.lower()}"
    cfgp = _config(rig, reg.target, device_id)
    _publish_desired(rig, device_id, data)
    try:
        d = Daemon(cfgp, crash=point)
        code = d.wait_exit()
        assert code == -signal.SIGKILL, f"exit {code}:\n" + "".join(d.lines[-30:])
        assert any(f"KESTREL_CRASH_AT={point}" in x for x in d.lines)
        d = Daemon(cfgp)  # started again, without the crash point (it then goes on with the update)
        try:
            m = d.wait_line(BOOT_RE)
            assert (m.group(1), int(m.group(2))) == ("brightness", expect), "".join(d.lines[-30:])
        finally:
            assert d.stop() == 0, "".join(d.lines[-30:])
        _check_active_slot(rig["tmp"] / "data")
        booted = m.group(3)
        # what it booted was a complete slot holding exactly that model (whatever happened after)
        slots = [json.loads((rig["tmp"] / "data" / "slots" / s / "slot.json").read_text())
                 for s in ("a", "b") if (rig["tmp"] / "data" / "slots" / s / "slot.json").exists()]
        assert any(r["version"] == expect and r["model_sha256"].startswith(booted) for r in slots)
    finally:
        _publish_desired(rig, device_id, b"")
        reg.stop()

