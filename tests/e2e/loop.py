"""The whole Kestrel loop on one machine: keys -> hub -> signed bundles -> edge daemon -> frames back.

Used by tests/e2e/test_loop.py and by ``python -m demo``. Everything runs as the real parts:
``python -m hub serve`` (embedded Mosquitto, SQLite) and ``python -m edge run`` as subprocesses,
bundles built and signed with edge.bundle, pushed/deployed over the hub's gRPC API. Every wait is
a condition with a timeout (tests.helpers.wait.wait_for); nothing sleeps for synchronisation.

    with Loop(work_dir, models_dir) as loop:
        loop.make_keys()
        loop.start_hub()
        loop.push(loop.bundle(1)); loop.deploy(1)
        loop.start_edge()
        loop.wait_device(version=1, state="COMMITTED")
        ...
    # __exit__ stops the edge and the hub (SIGTERM, then SIGKILL if they hang) even on failure
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tests.helpers.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "brightness"
LABELS = ["bright", "dark", "mid"]
DEVICE_ID = "cam-1"
GROUP = "demo"
# Test pattern: mostly bright frames (confident) with mid-grey ones (~1/3 each = low confidence).
PATTERN = [0.9, 0.9, 0.5, 0.9, 0.1, 0.5, 0.9, 0.45, 0.9, 0.55]
HUB_START_S = 30.0
EDGE_START_S = 30.0
STOP_TIMEOUT_S = 20.0


class LoopError(RuntimeError):
    """A step of the loop failed; the message says which and why (with the tail of the process log)."""


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return False


class Proc:
    """A child process with its log file; ``stop()`` = SIGTERM, wait, SIGKILL as a last resort."""

    def __init__(self, name: str, argv: List[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        self._fh = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(argv, cwd=str(REPO), env=env, stdout=self._fh, stderr=subprocess.STDOUT)
        self.killed = False

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def running(self) -> bool:
        return self.popen.poll() is None

    def check_running(self) -> None:
        if not self.running():
            tail = _tail(self.log)
            last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "(empty log)")
            raise LoopError(f"{self.name} exited with code {self.popen.returncode}: {last.strip()} (log {self.log})"
                            f"\n{tail}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.popen.kill()
                self.popen.wait(5)
        self._fh.close()
        return int(self.popen.returncode)


def http_json(url: str, timeout: float = 5.0) -> tuple:
    """(status, parsed JSON body or None); (0, None) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


def self_test_cases(model_path: Path, levels: Sequence[float] = (0.9, 0.1, 0.5)) -> Dict[str, Any]:
    """Self-test cases as the trainer computes them: the model's own scores on the edge runtime."""
    from edge.runtime import load_model
    from tests.helpers.bundles import BRIGHTNESS_SPEC

    m = load_model(str(model_path), spec=BRIGHTNESS_SPEC, labels=LABELS, threads=1)
    try:
        cases = []
        for level in levels:
            x = np.full(BRIGHTNESS_SPEC.shape, int(level * 255), np.uint8)
            cases.append({"input": base64.b64encode(x.tobytes()).decode("ascii"),
                          "expected": [float(v) for v in m.invoke(x)]})
    finally:
        m.close()
    return {"tolerance": 0.02, "cases": cases, "latency_budget_ms": None}


class Loop:
    """One hub and one edge device in ``work`` (keys, hub data, device data, logs, export)."""

    def __init__(self, work: Path, models_dir: Path, device_id: str = DEVICE_ID, group: str = GROUP) -> None:
        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.models_dir = Path(models_dir)
        self.device_id, self.group = device_id, group
        self.hub: Optional[Proc] = None
        self.edge: Optional[Proc] = None
        self.hub_info: Dict[str, Any] = {}
        self.priv_path: Optional[Path] = None
        self.trust_dir = self.work / "trust"
        self.hub_dir = self.work / "hub-data"
        self.edge_dir = self.work / "edge-data"
        self._client: Any = None
        self._store: Any = None

    # ---- context ----
    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- keys ----
    def make_keys(self) -> Path:
        """An Ed25519 signing key (keys/signing.key) and its public half in trust/ (what hub and edge trust)."""
        from edge import keys

        priv, pub = keys.generate_keypair(self.work / "keys")
        self.trust_dir.mkdir(exist_ok=True)
        shutil.copyfile(pub, self.trust_dir / pub.name)
        self.priv_path = priv
        return priv

    # ---- hub ----
    def write_hub_config(self) -> Path:
        path = self.work / "hub.toml"
        path.write_text("\n".join([
            "[hub]", f'data_dir = "{self.hub_dir}"',
            "[store]", 'url = ""',                       # SQLite in data_dir
            "[mqtt]", 'host = ""', "retry_initial_s = 0.05", "retry_max_s = 0.5",  # embedded Mosquitto
            "[grpc]", 'bind = "127.0.0.1"', "port = 0",
            "[http]", 'bind = "127.0.0.1"', "port = 0",
            "[registry]", f'trust_dir = "{self.trust_dir}"',
        ]) + "\n")
        return path

    def start_hub(self, timeout: float = HUB_START_S) -> Dict[str, Any]:
        cfg = self.write_hub_config()
        info = self.hub_dir / "hub.json"
        if info.exists():
            info.unlink()
        self.hub = Proc("hub", [sys.executable, "-m", "hub", "serve", "--config", str(cfg)], self.work / "hub.log")
        hub = self.hub

        def ready() -> bool:
            hub.check_running()
            return info.exists()

        wait_for(ready, timeout, interval=0.05, what="the hub to write hub.json")
        self.hub_info = json.loads(info.read_text())
        def healthy() -> bool:
            hub.check_running()
            return bool(self.health()[0] == 200)

        wait_for(healthy, timeout, interval=0.05, what="hub /healthz 200")
        return self.hub_info

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.hub_info['grpc_port']}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.hub_info['http_port']}"

    def health(self) -> tuple:
        return http_json(self.http_base + "/healthz")

    def broker_pid(self) -> Optional[int]:
        p = self.hub_dir / "broker" / "broker.json"
        try:
            return int(json.loads(p.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    @property
    def client(self) -> Any:
        if self._client is None:
            from hub.fleetcmd import HubClient

            self._client = HubClient(self.grpc_target, timeout_s=30.0)
        return self._client

    @property
    def store(self) -> Any:
        """The hub's own SQLite store, opened read/write next to the running hub (WAL allows it)."""
        if self._store is None:
            from hub.store.open import open_store

            self._store = open_store(str(self.hub_info.get("store") or self.hub_dir / "hub.db"))
        return self._store

    # ---- bundles, registry, fleet ----
    def bundle(self, version: int, model: str = "brightness_int8") -> bytes:
        from edge import bundle as bundlemod
        from edge import keys
        from tests.helpers.bundles import BRIGHTNESS_SPEC

        if self.priv_path is None:
            raise LoopError("make_keys() first")
        path = self.models_dir / f"{model}.tflite"
        if not path.is_file():
            raise LoopError(f"test model {path} is missing: run `python -m tests.helpers.models --out "
                            f"{self.models_dir}` first")
        return bundlemod.build_bundle(
            model_bytes=path.read_bytes(), labels=LABELS, model_name=MODEL_NAME, version=version,
            input_spec=BRIGHTNESS_SPEC, signing_key=keys.load_private_key(self.priv_path),
            default_threshold=0.6, metrics={"source": model}, self_test=self_test_cases(path))

    def push(self, data: bytes) -> Any:
        return self.client.push(data)

    def deploy(self, version: int) -> Any:
        return self.client.deploy(MODEL_NAME, version, group=self.group)

    def rollback(self) -> Any:
        return self.client.rollback(group=self.group)

    def device(self) -> Any:
        """This device's record as the hub's Fleet.ListDevices reports it (None before its first status)."""
        for d in self.client.list_devices(self.group):
            if d.device_id == self.device_id:
                return d
        return None

    def wait_device(self, version: int, state: str, timeout: float = 30.0) -> Any:
        """Wait until the hub sees the device reporting ``version`` in update state ``state``."""
        def cond() -> Any:
            if self.edge is not None:
                self.edge.check_running()
            d = self.device()
            if d is not None and d.reported.version == version and d.versions.update_state == state:
                return d
            return None

        try:
            return wait_for(cond, timeout, interval=0.1, what=f"{self.device_id} to report v{version} {state}")
        except AssertionError as exc:
            d = self.device()
            seen = (f"v{d.reported.version} {d.versions.update_state} {d.versions.reason!r}" if d is not None
                    else "no status yet")
            raise LoopError(f"{exc} (hub sees: {seen}); edge log:\n{_tail(self.work / 'edge.log')}") from None

    # ---- edge ----
    def write_edge_config(self, bootstrap: str = "brightness_float") -> Path:
        mqtt_host, mqtt_port = self.hub_info["mqtt_host"], int(self.hub_info["mqtt_port"])
        path = self.work / "edge.toml"
        levels = ", ".join(str(v) for v in PATTERN)
        path.write_text("\n".join([
            "[device]", f'id = "{self.device_id}"', f'group = "{self.group}"', f'data_dir = "{self.edge_dir}"',
            "[source]", 'kind = "testpattern"', 'name = "cam0"', "width = 160", "height = 120", "fps = 25.0",
            f"pattern_brightness = [{levels}]",
            "[model]", f'path = "{self.models_dir / (bootstrap + ".tflite")}"',
            f'labels = "{self.models_dir / "labels.txt"}"', "threads = 1",
            "[sampler]", "max_per_minute = 600", "max_per_hour = 6000",
            "[mqtt]", f'host = "{mqtt_host}"', f"port = {mqtt_port}", "reconnect_min_s = 0.1",
            "reconnect_max_s = 1.0",
            "[spool]", "max_bytes = 16777216",
            "[telemetry]", "interval_s = 1.0", "metrics_port = 0",
            "[update]", f'trust_dir = "{self.trust_dir}"', f'hub_grpc = "{self.grpc_target}"',
            "trial_frames = 20", "trial_seconds = 1.0",
        ]) + "\n")
        return path

    def start_edge(self) -> Proc:
        cfg = self.write_edge_config()
        self.edge = Proc("edge", [sys.executable, "-m", "edge", "run", "--config", str(cfg)], self.work / "edge.log")
        return self.edge

    # ---- frames, labels, export ----
    def frames(self, limit: int = 1000) -> List[Any]:
        return list(self.store.list_frames(device_id=self.device_id, limit=limit))

    def wait_frames(self, version: int, n: int = 3, timeout: float = 30.0) -> List[Any]:
        """Wait until ``n`` frames of model ``version`` are in the hub's store."""
        def cond() -> List[Any]:
            if self.edge is not None:
                self.edge.check_running()
            got = [f for f in self.frames() if f.model_name == MODEL_NAME and f.model_version == version]
            return got if len(got) >= n else []

        try:
            return wait_for(cond, timeout, interval=0.1, what=f"{n} frames of v{version} in the hub's store")
        except AssertionError as exc:
            raise LoopError(f"{exc}; edge log:\n{_tail(self.work / 'edge.log')}") from None

    def label(self, frames: Sequence[Any]) -> Dict[str, int]:
        """Label frames by the test pattern's ground truth: the frame's mean grey level (0.45 / 0.5 / 0.55
        for the low-confidence levels of PATTERN) - what a person looking at them would decide."""
        import cv2

        from hub.labels import set_label

        counts: Dict[str, int] = {}
        for f in frames:
            rec = self.store.get_frame(f.frame_id)
            img = cv2.imdecode(np.frombuffer(rec.image, np.uint8), cv2.IMREAD_GRAYSCALE) if rec else None
            if img is None:
                raise LoopError(f"stored frame {f.frame_id} has no decodable image")
            mean = float(img.mean()) / 255.0
            name = "bright" if mean > 0.525 else "dark" if mean < 0.475 else "mid"
            set_label(self.store, f.frame_id, name)
            counts[name] = counts.get(name, 0) + 1
        return counts

    def export(self, out: Path) -> subprocess.CompletedProcess:
        cfg = self.work / "hub.toml"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-m", "hub", "export", "--config", str(cfg), "--out", str(out),
                               "--force"], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)

    # ---- shutdown ----
    def stop_edge(self) -> int:
        if self.edge is None:
            return 0
        rc = self.edge.stop()
        if self.edge.killed:
            raise LoopError(f"the edge daemon did not stop within {STOP_TIMEOUT_S}s of SIGTERM (killed)")
        return rc

    def stop_hub(self) -> int:
        if self.hub is None:
            return 0
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._store is not None:
            self._store.close()
            self._store = None
        rc = self.hub.stop()
        if self.hub.killed:
            raise LoopError(f"the hub did not stop within {STOP_TIMEOUT_S}s of SIGTERM (killed)")
        return rc

    def close(self) -> None:
        """Stop everything still running (edge first, then hub); never raises."""
        broker = self.broker_pid()
        for proc in (self.edge, self.hub):
            if proc is not None:
                try:
                    proc.stop()
                except Exception:  # noqa: BLE001 - cleanup must go on
                    pass
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._store is not None:
            try:
                self._store.close()
            except Exception:  # noqa: BLE001
                pass
            self._store = None
        if broker is not None and _pid_alive(broker):  # the hub should have taken it down; make sure
            try:
                os.kill(broker, signal.SIGTERM)
            except OSError:
                pass


def broker_gone(pid: Optional[int], timeout: float = 10.0) -> bool:
    """True once the embedded Mosquitto ``pid`` has exited."""
    if pid is None:
        return True
    try:
        wait_for(lambda: not _pid_alive(pid), timeout, interval=0.05, what=f"mosquitto pid {pid} to exit")
    except AssertionError:
        return False
    return True


def now() -> float:
    return time.monotonic()
