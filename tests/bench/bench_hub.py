"""Hub ingest benchmark: 50 KB frames at QoS 1 into the SQLite store, on a private Mosquitto.

1. Throughput: one burst of THROUGHPUT_FRAMES frames is published as fast as the broker takes them;
   a `kestrel-hub serve` subprocess (share group of one) and a bare `mosquitto_sub -q 1` drain the
   same stream in the same run. Figures: frames/s of each from the first publish to the last frame
   stored (hub, read from /healthz) or received (mosquitto_sub), and the ratio (target >= 0.8).
2. Latency: LAT_DEVICES devices x LAT_FPS frames/s for LAT_SECONDS, paced, from a publisher
   subprocess; the hub's ingest runs in this process with an on_stored hook, so publish->stored is
   measured per frame on one clock. Figures: p50/p95/max ms (target p95 < 50 ms).

Run: PYTHONPATH=. .venv/bin/python tests/bench/bench_hub.py [out_dir]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edge import topics  # noqa: E402
from proto import kestrel_pb2  # noqa: E402

FRAME_BYTES = 50 * 1024
THROUGHPUT_FRAMES = int(os.environ.get("KESTREL_BENCH_HUB_FRAMES", "3000"))
LAT_DEVICES = 20
LAT_FPS = 10.0
LAT_SECONDS = float(os.environ.get("KESTREL_BENCH_HUB_SECONDS", "15"))


def _image(seed: int) -> bytes:
    """A JPEG of about FRAME_BYTES (noise compresses badly, so size tracks pixel count)."""
    rng = np.random.default_rng(seed)
    side = 120
    while True:
        img = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if len(buf) >= FRAME_BYTES or side > 400:
            return bytes(buf.tobytes())
        side += 8


def _payload(frame_id: str, device: str, image: bytes, seq: int) -> bytes:
    return kestrel_pb2.Frame(frame_id=frame_id, device_id=device, capture_time_ms=int(time.time() * 1000),
                             model=kestrel_pb2.ModelRef(name="bench", version=1, sha256="0" * 64),
                             reasons=[kestrel_pb2.LOW_CONFIDENCE],
                             top_k=[kestrel_pb2.TopScore(index=0, label="a", score=0.4)], image=image,
                             image_format="jpeg", width=0, height=0, source="bench", sequence=seq,
                             image_bytes=len(image)).SerializeToString()


# ---- publisher subprocess ----
def publish_main(argv: List[str]) -> int:
    import paho.mqtt.client as mqtt
    host, port, mode, out = argv[0], int(argv[1]), argv[2], Path(argv[3])
    images = [_image(i) for i in range(8)]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, clean_session=True)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    times: Dict[str, float] = {}
    infos = []
    run = uuid.uuid4().hex[:6]
    if mode == "burst":
        n = int(argv[4])
        t0 = time.time()
        for i in range(n):
            dev = f"dev{i % 20}"
            infos.append(c.publish(topics.frames(dev), _payload(f"{run}-{i}", dev, images[i % 8], i), qos=1))
        for info in infos:
            info.wait_for_publish(120)
        times = {"start": t0, "acked": time.time()}
    else:
        devices, fps, seconds = int(argv[4]), float(argv[5]), float(argv[6])
        payloads = {}
        period = 1.0 / (fps * devices)
        t0 = time.monotonic()
        i = 0
        while True:
            due = t0 + i * period
            if due - t0 >= seconds:
                break
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            dev = f"dev{i % devices}"
            fid = f"{run}-{i}"
            payloads[fid] = _payload(fid, dev, images[i % 8], i)
            times[fid] = time.time()
            infos.append(c.publish(topics.frames(dev), payloads.pop(fid), qos=1))
            i += 1
        for info in infos:
            info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()
    out.write_text(json.dumps(times))
    return 0


def _publisher(host: str, port: int, out: Path, *args: str) -> subprocess.Popen:
    argv = [sys.executable, str(Path(__file__).resolve()), "--publish", host, str(port), *args[:1], str(out),
            *args[1:]]
    return subprocess.Popen(argv, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))


def _health(port: int) -> Dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _start_hub(out_dir: Path, name: str, broker: Any, client_id: str,
               group: str) -> Tuple[subprocess.Popen, int]:
    data = out_dir / name
    cfg = out_dir / f"{name}.toml"
    cfg.write_text(f'[hub]\ndata_dir = "{data}"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
                   f'client_id = "{client_id}"\nshare_group = "{group}"\n'
                   '[grpc]\nport = 0\n[http]\nport = 0\n')
    info = data / "hub.json"
    if info.exists():
        info.unlink()
    with open(out_dir / f"{name}.log", "ab") as log:
        hub = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--config", str(cfg)],
                               cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log,
                               stderr=subprocess.STDOUT)
    _wait(lambda: info.exists(), 60, "hub.json")
    port = int(json.loads(info.read_text())["http_port"])
    _wait(lambda: _health(port)["broker"]["connected"], 30, "hub connected")
    return hub, port


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class SubCounter:
    """`mosquitto_sub -q 1` printing one line per message; counts lines with their arrival times."""

    def __init__(self, broker: Any, client_id: str, persistent: bool) -> None:
        args = ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                "-t", topics.ALL_FRAMES, "-i", client_id, "-F", "%m"]
        if persistent:
            args.append("-c")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE)
        self.times: List[float] = []
        self.primes = 0
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            self.times.append(time.time())

    def stop(self) -> None:
        _stop(self.proc)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hub_progress(port: int, n: int, base: int, timeout: float) -> Tuple[float, float, int]:
    """Poll /healthz until `stored` reaches base + n: (time of first progress, time done, stored at first)."""
    t_first = 0.0
    at_first = base
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = int(_health(port)["ingest"]["stored"])
        now = time.time()
        if not t_first and stored > base:
            t_first, at_first = now, stored
        if stored >= base + n:
            return t_first, now, at_first
        time.sleep(0.01)
    raise RuntimeError(f"the hub stored only {stored - base} of {n} frames in {timeout}s")


def bench_throughput(out_dir: Path, broker: Any) -> Dict[str, Any]:
    """Two runs: `live` (consumers drain while the publisher sends) and `backlog` (the frames are queued
    at the broker for both persistent sessions first, then both consumers start and drain them)."""
    n = THROUGHPUT_FRAMES
    result: Dict[str, Any] = {"frames": n, "frame_bytes": FRAME_BYTES, "target_ratio": 0.8}
    tag = uuid.uuid4().hex[:6]
    hub_id, sub_id, group = f"bench-hub-{tag}", f"bench-sub-{tag}", f"bench{tag}"

    # live
    hub, port = _start_hub(out_dir, "hub-tp", broker, hub_id, group)
    sub = SubCounter(broker, sub_id, persistent=True)
    try:
        _wait(lambda: _prime(broker, sub, 1), 30, "mosquitto_sub subscribed")
        primes = sub.primes
        _wait(lambda: int(_health(port)["ingest"]["stored"]) >= primes, 30, "hub stored the primer")
        base = primes
        out = out_dir / "burst-live.json"
        pub = _publisher(broker.host, broker.port, out, "burst", str(n))
        _, t_hub, _ = _hub_progress(port, n, base, 600)
        pub.wait(120)
        _wait(lambda: len(sub.times) >= n + primes, 60, "mosquitto_sub got every frame")
        start = json.loads(out.read_text())["start"]
        times = json.loads(out.read_text())
        hub_fps, sub_fps = n / (t_hub - start), n / (sub.times[n + primes - 1] - start)
        result["live"] = {"publish_fps": round(n / (times["acked"] - start), 1), "hub_fps": round(hub_fps, 1),
                          "mosquitto_sub_fps": round(sub_fps, 1), "ratio": round(hub_fps / sub_fps, 3)}
    finally:
        sub.stop()
        _stop(hub)
    # backlog: both sessions are offline and persistent; queue n frames, then start both at once
    out = out_dir / "burst-backlog.json"
    pub = _publisher(broker.host, broker.port, out, "burst", str(n))
    pub.wait(300)
    sub = SubCounter(broker, sub_id, persistent=True)
    hub, port = _start_hub(out_dir, "hub-tp", broker, hub_id, group)
    try:
        cpu0 = _cpu_s(hub.pid)
        t_first, t_done, at_first = _hub_progress(port, n, 0, 600)
        cpu_hub = _cpu_s(hub.pid) - cpu0
        _wait(lambda: len(sub.times) >= n, 60, "mosquitto_sub drained the backlog")
        cpu_sub = _cpu_s(sub.proc.pid)
        hub_fps = (n - at_first) / max(1e-6, t_done - t_first)
        sub_fps = (n - 1) / max(1e-6, sub.times[n - 1] - sub.times[0])
        result["backlog"] = {"hub_fps": round(hub_fps, 1), "mosquitto_sub_fps": round(sub_fps, 1),
                             "ratio": round(hub_fps / sub_fps, 3),
                             "hub_cpu_ms_per_frame": round(cpu_hub * 1000 / n, 3),
                             "mosquitto_sub_cpu_ms_per_frame": round(cpu_sub * 1000 / n, 3),
                             "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    finally:
        sub.stop()
        _stop(hub)
    return result


def _prime(broker: Any, sub: SubCounter, k: int) -> bool:
    """Publish one frame and report whether mosquitto_sub has received k so far (proves it subscribed)."""
    if len(sub.times) >= k:
        return True
    import paho.mqtt.client as mqtt
    sub.primes += 1
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(topics.frames("dev0"), _payload(f"prime-{uuid.uuid4().hex}", "dev0", _image(99), 0),
              qos=1).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and len(sub.times) < k:
        time.sleep(0.01)
    return len(sub.times) >= k


def bench_latency(out_dir: Path, broker: Any) -> Dict[str, Any]:
    from hub.broker import BrokerTarget
    from hub.config import MqttSection
    from hub.ingest import Ingest
    from hub.store.base import FrameRecord
    from hub.store.sqlite import SqliteStore

    stored_at: Dict[str, float] = {}

    def on_stored(frames: List[FrameRecord]) -> None:
        t = time.time()
        for f in frames:
            stored_at[f.frame_id] = t

    store = SqliteStore(out_dir / "latency.db")
    ing = Ingest(store, BrokerTarget(broker.host, broker.port),
                 MqttSection(share_group=f"lat{uuid.uuid4().hex[:6]}"), f"bench-lat-{uuid.uuid4().hex[:6]}",
                 on_stored=on_stored).start()
    try:
        if not ing.wait_subscribed(15):
            raise RuntimeError("ingest did not subscribe")
        out = out_dir / "paced.json"
        pub = _publisher(broker.host, broker.port, out, "paced", str(LAT_DEVICES), str(LAT_FPS),
                         str(LAT_SECONDS))
        pub.wait(LAT_SECONDS + 120)
        sent = json.loads(out.read_text())
        _wait(lambda: all(k in stored_at for k in sent), 60, "every paced frame stored")
        lat = np.array([(stored_at[k] - t) * 1000.0 for k, t in sent.items()])
        return {"devices": LAT_DEVICES, "fps_per_device": LAT_FPS, "seconds": LAT_SECONDS,
                "frames": len(sent),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
                "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
                "latency_ms_max": round(float(lat.max()), 2), "target_p95_ms": 50}
    finally:
        ing.stop()
        store.close()


def main(out_dir: Path) -> Dict[str, Any]:
    from tests.helpers.broker import Mosquitto
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(out_dir / "mosquitto").start()
    try:
        result = {"throughput": bench_throughput(out_dir, broker), "latency": bench_latency(out_dir, broker)}
    finally:
        broker.stop()
    (out_dir / "bench_hub.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        sys.exit(publish_main(sys.argv[2:]))
    print(json.dumps(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/bench_hub")), indent=2))
