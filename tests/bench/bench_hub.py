"""Hub ingest benchmark: 50 KB JPEG frames at QoS 1 into the SQLite store, against the real hub.

Every phase starts a fresh ``kestrel-hub serve`` process (``python -m hub serve``) on a fresh data
directory with its embedded Mosquitto (the embedded default: a fresh broker, so no session of an
earlier phase is subscribed and nothing is queued for it). The hub's config is the default one
except for ephemeral ports; ``KESTREL_BENCH_HUB_SYNC`` picks ``[store] sqlite_synchronous``.

1. Throughput (live; then once more with ``sqlite_synchronous = "NORMAL"`` for comparison):
   THROUGHPUT_FRAMES frames are published as fast as the broker takes them while
   the hub and a bare ``mosquitto_sub -q 1`` (clean session, prints one line per message) drain the
   same stream. Figures: frames/s of each from the first publish to the last frame committed (seen
   in the hub's SQLite file by a reader in this process) or received (mosquitto_sub), their ratio
   (target >= 0.8), CPU ms per frame of the hub, its broker, the publisher and mosquitto_sub, and
   how busy the whole machine was (1.0 = every core; other work on the machine shows here).
2. Latency: LAT_DEVICES devices x LAT_FPS frames/s for LAT_SECONDS, paced, from a publisher
   subprocess; a reader in this process polls the hub's SQLite file (``PRAGMA data_version``, then
   the new rows) so publish -> committed and visible to another process is measured per frame on
   one clock. Figures: p50/p95/max ms (target p95 < 50 ms).

Run alone: ``.venv/bin/python -m tests.bench.run --out /tmp/bench-hub --only bench_hub``.
Knobs: ``KESTREL_BENCH_HUB_FRAMES`` (10000), ``KESTREL_BENCH_HUB_SECONDS`` (10), ``KESTREL_BENCH_HUB_MQTT``
(extra ``[mqtt]`` lines). Profiling: ``KESTREL_BENCH_HUB_PYSPY=/path/to/py-spy`` records the hub's
stacks per phase (collapsed, ``<phase>.txt``; ``KESTREL_BENCH_HUB_PYSPY_ARGS=--gil`` etc.).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from proto import topics  # noqa: E402
from tests.helpers.wait import wait_for  # noqa: E402
from tests.hub import HubProcess, frame_payload  # noqa: E402

FRAME_BYTES = 50 * 1024
# ~3 s of publishing at this VM's rate: the issue asks for a *sustained* rate; 3000 frames (< 1 s) measured
# mostly the start (the first batches, a new segment file) and moved +-5 % from run to run
THROUGHPUT_FRAMES = int(os.environ.get("KESTREL_BENCH_HUB_FRAMES", "10000"))
LAT_DEVICES = 20
LAT_FPS = 10.0
LAT_SECONDS = float(os.environ.get("KESTREL_BENCH_HUB_SECONDS", "10"))
SYNC = os.environ.get("KESTREL_BENCH_HUB_SYNC", "")  # "" = the hub's default
PYSPY = os.environ.get("KESTREL_BENCH_HUB_PYSPY", "")
MQTT_EXTRA = os.environ.get("KESTREL_BENCH_HUB_MQTT", "")  # extra [mqtt] lines, e.g. "validate_workers = 1"
POLL_S = 0.001


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
        payloads = [frame_payload(f"{run}-{i}", f"dev{i % 20}", image=images[i % 8], seq=i) for i in range(n)]
        t0 = time.time()
        for i, p in enumerate(payloads):
            infos.append(c.publish(topics.frames(f"dev{i % 20}"), p, qos=1))
        for info in infos:
            info.wait_for_publish(120)
        times = {"start": t0, "acked": time.time()}
    else:
        devices, fps, seconds = int(argv[4]), float(argv[5]), float(argv[6])
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
            payload = frame_payload(fid, dev, image=images[i % 8], seq=i)
            times[fid] = time.time()
            infos.append(c.publish(topics.frames(dev), payload, qos=1))
            i += 1
        for info in infos:
            info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()
    out.write_text(json.dumps(times))
    return 0


def _publisher(host: str, port: int, out: Path, *args: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--publish", host, str(port), *args[:1], str(out),
            *args[1:]]
    return subprocess.Popen(argv, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _system_busy() -> Tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine since boot (/proc/stat)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return float(sum(vals) - idle), float(sum(vals))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Hub(HubProcess):
    """A fresh ``kestrel-hub serve`` with its embedded broker on a fresh data dir (the hub's default config
    but for ephemeral ports: not tests.hub.write_config's, which shortens the store retries)."""

    def __init__(self, out_dir: Path, name: str, sync: str = "") -> None:
        self.data = out_dir / name
        if self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True)
        cfg = out_dir / f"{name}.toml"
        sync = sync or SYNC
        store = f'[store]\nsqlite_synchronous = "{sync}"\n' if sync else ""
        mqtt = f'[mqtt]\n{MQTT_EXTRA}\n' if MQTT_EXTRA else ""
        # a plain broker, as in the figures of docs/hub.md (TLS and the ACL are measured apart, docs/security.md)
        cfg.write_text(f'[hub]\ndata_dir = "{self.data}"\n{store}{mqtt}[grpc]\nport = 0\n[http]\nport = 0\n'
                       '[security]\ntls = false\n')
        log = out_dir / f"{name}.log"
        if log.exists():  # HubProcess appends: one run's log per file
            log.unlink()
        super().__init__(cfg, self.data, log)
        self.start(timeout=60)
        info = self.info
        self.http_port, self.host, self.port = int(info["http_port"]), str(info["mqtt_host"]), int(info["mqtt_port"])
        self.db = self.data / "hub.db"
        wait_for(lambda: self.health()["broker"]["connected"], 30, interval=0.01, what="hub connected")
        self.spy: Optional[subprocess.Popen[bytes]] = None
        if PYSPY:
            extra = os.environ.get("KESTREL_BENCH_HUB_PYSPY_ARGS", "").split()
            self.spy = subprocess.Popen([PYSPY, "record", "--pid", str(self.proc.pid), "--threads", "--rate", "250",
                                         *extra,
                                         "--format", "raw", "--output", str(out_dir / f"{name}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stored(self) -> int:
        return int(self.health()["ingest"]["stored"])

    def stop(self) -> int:
        if self.spy is not None:
            self.spy.send_signal(2)
            try:
                self.spy.wait(30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
        return super().stop()


def _prime(hub: Hub, n: int) -> None:
    """Publish one frame and wait until the hub stored it: proves the shared subscription is live."""
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(hub.host, hub.port)
    c.loop_start()
    try:
        c.publish(topics.frames("dev0"), frame_payload(f"prime-{uuid.uuid4().hex}", "dev0", image=_image(99), seq=0),
                  qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()
    wait_for(lambda: hub.stored() >= n, 30, interval=0.01, what="the hub stored the primer")


class SubCounter:
    """``mosquitto_sub -q 1`` (clean session) printing one line per message (the payload length)."""

    def __init__(self, host: str, port: int) -> None:
        self.proc = subprocess.Popen(["mosquitto_sub", "-h", host, "-p", str(port), "-q", "1",
                                      "-t", topics.ALL_FRAMES, "-F", "%l"], stdout=subprocess.PIPE)
        self.times: List[float] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            self.times.append(time.time())

    def stop(self) -> None:
        _stop(self.proc)


def bench_throughput(out_dir: Path, sync: str = "") -> Dict[str, Any]:
    n = THROUGHPUT_FRAMES
    hub = Hub(out_dir, f"hub-throughput{'-' + sync.lower() if sync else ''}", sync)
    sub = SubCounter(hub.host, hub.port)
    watcher: Optional[StoreWatcher] = None
    try:
        _prime(hub, 1)
        wait_for(lambda: len(sub.times) >= 1, 30, interval=0.01, what="mosquitto_sub subscribed")
        watcher = StoreWatcher(hub.db)
        w = watcher
        wait_for(lambda: len(w.seen) >= 1, 30, interval=0.01, what="the watcher saw the primer")
        base_sub = len(sub.times)
        broker_pid = int(json.loads((hub.data / "broker" / "broker.json").read_text())["pid"])
        pids = {"hub": hub.proc.pid, "broker": broker_pid, "mosquitto_sub": sub.proc.pid}
        cpu0 = {k: _cpu_s(p) for k, p in pids.items()}
        sys0 = _system_busy()
        out = out_dir / "burst.json"
        pub = _publisher(hub.host, hub.port, out, "burst", str(n))
        pids["publisher"] = pub.pid
        cpu0["publisher"] = _cpu_s(pids["publisher"])
        pub_cpu = cpu0["publisher"]
        while pub.poll() is None and len(sub.times) < base_sub + n:
            pub_cpu = _cpu_s(pids["publisher"])  # last reading before it exits (includes image making)
            time.sleep(0.01)
        wait_for(lambda: len(w.seen) >= n + 1, 300, interval=0.005, what=f"the hub stored {n} frames")
        sys1 = _system_busy()
        cpu = {k: _cpu_s(p) - cpu0[k] for k, p in pids.items() if k != "publisher"}
        cpu["publisher"] = pub_cpu - cpu0["publisher"]
        t_hub = max(w.seen.values())
        if pub.wait(120) != 0:
            raise RuntimeError("the publisher failed")
        wait_for(lambda: len(sub.times) >= base_sub + n, 60, interval=0.01, what="mosquitto_sub got every frame")
        times = json.loads(out.read_text())
        start = times["start"]
        hub_fps = n / (t_hub - start)
        sub_fps = n / (sub.times[base_sub + n - 1] - start)
        h = hub.health()["ingest"]
        return {"frames": n, "frame_bytes": FRAME_BYTES, "publish_fps": round(n / (times["acked"] - start), 1),
                "hub_fps": round(hub_fps, 1), "mosquitto_sub_fps": round(sub_fps, 1),
                "ratio": round(hub_fps / sub_fps, 3), "target_ratio": 0.8,
                "cpu_ms_per_frame": {k: round(v * 1000 / n, 3) for k, v in cpu.items()},
                "machine_busy": round((sys1[0] - sys0[0]) / max(1.0, sys1[1] - sys0[1]), 2),
                "hub_commits": h["commits"], "hub_commit_ms_max": h["commit_ms_max"],
                "duplicates": h["duplicates"], "rejected": sum(h["rejected"].values())}
    finally:
        if watcher is not None:
            watcher.stop()
        sub.stop()
        hub.stop()


class StoreWatcher:
    """Polls the hub's SQLite file from another connection and records when each frame becomes visible."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seen: Dict[str, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None)
        last_version, last_rowid = -1, 0
        while not self._stop.is_set():
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != last_version:
                last_version = version
                rows = conn.execute("SELECT rowid, frame_id FROM frames WHERE rowid > ? ORDER BY rowid",
                                    (last_rowid,)).fetchall()
                t = time.time()
                for rowid, fid in rows:
                    self.seen.setdefault(fid, t)
                    last_rowid = max(last_rowid, rowid)
            time.sleep(POLL_S)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def bench_latency(out_dir: Path) -> Dict[str, Any]:
    hub = Hub(out_dir, "hub-latency")
    watcher: Optional[StoreWatcher] = None
    try:
        _prime(hub, 1)
        watcher = StoreWatcher(hub.db)
        out = out_dir / "paced.json"
        pub = _publisher(hub.host, hub.port, out, "paced", str(LAT_DEVICES), str(LAT_FPS), str(LAT_SECONDS))
        if pub.wait(LAT_SECONDS + 120) != 0:
            raise RuntimeError("the publisher failed")
        sent: Dict[str, float] = json.loads(out.read_text())
        w = watcher
        wait_for(lambda: all(k in w.seen for k in sent), 60, interval=0.05, what="every paced frame stored")
        lat = np.array([(w.seen[k] - t) * 1000.0 for k, t in sent.items()])
        h = hub.health()["ingest"]
        return {"devices": LAT_DEVICES, "fps_per_device": LAT_FPS, "seconds": LAT_SECONDS,
                "frames": len(sent),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
                "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
                "latency_ms_max": round(float(lat.max()), 2), "target_p95_ms": 50,
                "hub_commits": h["commits"], "hub_commit_ms_max": h["commit_ms_max"]}
    finally:
        if watcher is not None:
            watcher.stop()
        hub.stop()


def main(out_dir: Path) -> Dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"sqlite_synchronous": SYNC or "default",
                              "load_avg_1m_before": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    result["throughput"] = bench_throughput(out_dir)
    result["latency"] = bench_latency(out_dir)
    if not SYNC:  # the same stream with the faster, less durable setting, for comparison (docs/hub.md)
        result["throughput_sqlite_normal"] = bench_throughput(out_dir, "NORMAL")
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    (out_dir / "bench_hub.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        sys.exit(publish_main(sys.argv[2:]))
    print(json.dumps(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/bench_hub")), indent=2))
