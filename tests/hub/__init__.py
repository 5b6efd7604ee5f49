"""Helpers shared by the hub suites: frame payloads, hub configs and `python -m hub serve` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import cv2
import numpy as np

from proto import kestrel_pb2
from tests.helpers.wait import wait_for

REPO = Path(__file__).resolve().parents[2]


def jpeg(seed: int = 0, w: int = 64, h: int = 48, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return bytes(buf.tobytes())


def frame_msg(frame_id: str, device_id: str = "cam-1", image: Optional[bytes] = None, seq: int = 0,
              capture_ms: int = 1_700_000_000_000) -> kestrel_pb2.Frame:
    img = jpeg(seq) if image is None else image
    return kestrel_pb2.Frame(
        frame_id=frame_id, device_id=device_id, capture_time_ms=capture_ms + seq,
        model=kestrel_pb2.ModelRef(name="brightness", version=3, sha256="ab" * 32),
        reasons=[kestrel_pb2.LOW_CONFIDENCE],
        top_k=[kestrel_pb2.TopScore(index=1, label="dark", score=0.41),
               kestrel_pb2.TopScore(index=0, label="bright", score=0.35)],
        image=img, image_format="jpeg", width=64, height=48, source="cam0", sequence=seq,
        image_bytes=len(img))


def frame_payload(frame_id: str, device_id: str = "cam-1", **kw: object) -> bytes:
    return frame_msg(frame_id, device_id, **kw).SerializeToString()  # type: ignore[arg-type]


def write_config(path: Path, data_dir: Path, broker_host: str = "", broker_port: int = 0,
                 client_id: str = "", store_url: str = "", extra_mqtt: str = "", security: str = "",
                 grpc: str = "") -> Path:
    """A hub.toml for tests. ``security``: lines of its [security] section (empty = the defaults: the
    embedded broker speaks TLS with client certificates, see tests/hub/test_security.py); ``grpc``: more
    lines of its [grpc] section."""
    lines = ["[hub]", f'data_dir = "{data_dir}"', "[store]", f'url = "{store_url}"', "[mqtt]",
             f'host = "{broker_host}"', f"port = {broker_port}", f'client_id = "{client_id}"',
             "retry_initial_s = 0.05", "retry_max_s = 0.5", extra_mqtt,
             "[grpc]", "port = 0", grpc, "[http]", "port = 0", "[security]", security]
    path.write_text("\n".join(lines) + "\n")
    return path


class HubProcess:
    """`python -m hub serve --config X` as a subprocess; reads the bound ports from <data_dir>/hub.json."""

    def __init__(self, config: Path, data_dir: Path, log: Path) -> None:
        self.config, self.data_dir, self.log_path = config, data_dir, log
        self.proc: Optional[subprocess.Popen] = None
        self.info: Dict[str, object] = {}

    def start(self, timeout: float = 30.0) -> HubProcess:
        info = self.data_dir / "hub.json"
        if info.exists():
            info.unlink()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--config", str(self.config)],
                                     cwd=str(REPO), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: info.exists() or self.proc.poll() is not None, timeout, what="hub.json")  # type: ignore
        if self.proc.poll() is not None:
            raise AssertionError(f"hub exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
        self.info = json.loads(info.read_text())
        return self

    def grpc_client(self, token: str = "", timeout: float = 20.0) -> Any:
        """A HubClient of this hub's gRPC port: TLS with its fleet CA, ``token`` or its first admin token."""
        return grpc_client(self.info["grpc_port"], self.data_dir, token, timeout)

    def health(self) -> Dict[str, object]:
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.info['http_port']}/healthz", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 503 still carries the JSON
            return json.loads(exc.read())

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode if self.proc else 0


def grpc_credentials(data_dir: Path, token: str = "") -> Any:
    """How a test reaches the gRPC port of the hub whose data is ``data_dir``: TLS verified with its fleet CA
    (<data_dir>/security/ca-bundle.crt), and ``token`` or the hub's first admin token (<data_dir>/admin-token)."""
    from proto.hubcreds import Credentials

    ca = Path(data_dir) / "security" / "ca-bundle.crt"
    token = token or (Path(data_dir) / "admin-token").read_text().strip()
    return Credentials(token=token, ca_pem=ca.read_bytes(), ca_file=str(ca))


def grpc_client(port: Any, data_dir: Path, token: str = "", timeout: float = 20.0) -> Any:
    """A proto.hubclient.HubClient of the hub on 127.0.0.1:``port`` (see grpc_credentials)."""
    from proto.hubclient import HubClient

    return HubClient(f"127.0.0.1:{port}", timeout, grpc_credentials(data_dir, token))


def publish_all(host: str, port: int, items: List[tuple], qos: int = 1, timeout: float = 30.0,
                ca_file: str = "", cert_file: str = "", key_file: str = "", retain: bool = False) -> None:
    """Publish (topic, payload) pairs at QoS 1 and wait until the broker acknowledged every one
    (over TLS when ``ca_file`` is given, with a client certificate when ``cert_file`` is)."""
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    if ca_file:
        c.tls_set(ca_certs=ca_file, certfile=cert_file or None, keyfile=key_file or None)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=qos, retain=retain) for t, p in items]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge a publish"
    finally:
        c.disconnect()
        c.loop_stop()


def enrol(config: Path, name: str, out: Path, *args: str) -> Dict[str, Path]:
    """`kestrel-hub devices add NAME` through the real CLI; the identity bundle's members extracted into
    ``out/NAME`` (secrets 0600): member name -> path."""
    from hub.security.identity import read_bundle

    r = subprocess.run([sys.executable, "-m", "hub", "devices", "add", name, "--config", str(config), "--out",
                        str(out), *args], cwd=str(REPO), capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert r.returncode == 0, r.stderr
    files: Dict[str, Path] = {}
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    for member, data in read_bundle(out / f"{name}.identity.tar").items():
        files[member] = target / member
        files[member].write_bytes(data)
        files[member].chmod(0o600)
    return files


def hub_identity(data_dir: Path) -> Dict[str, str]:
    """TLS files of the hub's own MQTT identity (it may publish anywhere): ca_file, cert_file, key_file."""
    sec = data_dir / "security"
    return {"ca_file": str(sec / "ca.crt"), "cert_file": str(sec / "hub.crt"), "key_file": str(sec / "hub.key")}
