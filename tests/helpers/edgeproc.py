"""The real edge daemon as a subprocess for end-to-end tests and benchmarks (tests/e2e, tests/bench)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional

from demo.loop import toml_doc
from hub.broker import free_port

REPO = Path(__file__).resolve().parents[2]


def identity_mqtt(files: Dict[str, Path]) -> Dict[str, Any]:
    """The [mqtt] TLS settings of a device enrolled with `kestrel-hub devices add` (tests.hub.enrol's
    files): what a Device needs on the hub's default broker (TLS, client certificates, the ACL)."""
    return {"tls": True, "ca_file": str(files["ca.crt"]), "cert_file": str(files["device.crt"]),
            "key_file": str(files["device.key"])}


class Device:
    """`python -m edge run` on a test pattern (``fps`` frames/s, ``max_frames`` then it ends; 0 = no end),
    every frame sampled; figures from its /metrics. Started in the constructor; another Device on the same
    ``tmp`` and ``device_id`` is the same device restarted (same data dir, so the same spool)."""

    def __init__(self, tmp: Path, models_dir: Path, device_id: str, mqtt_port: int, fps: float = 10.0,
                 max_frames: int = 0, run: str = "", source: Optional[Dict[str, Any]] = None, **mqtt: Any) -> None:
        """``source``: another [source] section instead of the test pattern."""
        self.id = device_id
        self.metrics_port = free_port()
        self.log = tmp / f"{device_id}{run}.log"
        cfg = tmp / f"{device_id}{run}.toml"
        cfg.write_text(toml_doc({
            "device": {"id": device_id, "data_dir": str(tmp / f"{device_id}-data")},
            "source": source or {"kind": "testpattern", "width": 64, "height": 48, "fps": fps,
                                 "max_frames": max_frames, "pattern_brightness": [0.5, 0.45, 0.55]},
            "model": {"path": str(models_dir / "brightness_int8.tflite"), "labels": str(models_dir / "labels.txt"),
                      "threads": 1},
            "sampler": {"confidence_threshold": 0.6, "dedup_distance": -1, "max_per_minute": 0,
                        "max_per_hour": 0, "max_per_day": 0},
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
                     "ack_timeout_s": 2.0, **mqtt},
            "telemetry": {"interval_s": 0, "metrics_port": self.metrics_port},
            "update": {"enabled": False},
        }))
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(cfg)], cwd=str(REPO),
                                         env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                                         stderr=err)

    def metric(self, name: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return -1.0
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return -1.0

    def stop(self) -> Dict[str, Any]:
        """SIGTERM (the daemon waits up to 5 s for the last receipts); its summary."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = 60.0) -> Dict[str, Any]:
        """Its exit (code 0) and summary."""
        self.proc.wait(timeout)
        text = self.log.read_text()
        assert self.proc.returncode == 0, text[-3000:]
        lines = [ln for ln in text.splitlines() if "edge.daemon: summary " in ln]
        assert lines, text[-3000:]
        return dict(json.loads(lines[-1].split("summary ", 1)[1]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
