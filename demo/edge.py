"""``python -m demo.edge --out DIR``: the edge loop on one machine, offline, in under a minute.

Starts a private Mosquitto on a free loopback port (config in DIR), writes a video whose frames
vary in brightness and an edge.toml for the brightness_int8 test model, runs ``kestrel-edge run``
on it, subscribes to the device's frame topic and prints what arrived (count, reasons, top-k).
Exits non-zero when nothing arrived. Test models: $KESTREL_TEST_MODELS or .cache/test-models
(``python -m tests.helpers.models`` builds them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

import cv2
import numpy as np

from hub.broker import free_port, port_open

REPO = Path(__file__).resolve().parents[1]
DEVICE_ID = "demo-cam"
RUN_TIMEOUT_S = 45.0


def write_video(path: Path, levels: Sequence[float], width: int = 320, height: int = 240, fps: float = 10.0,
                fourcc: str = "MJPG", texture: bool = True) -> Path:
    """Write one frame per brightness level (0..1) with a little moving texture; MJPG/.avi by default."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write video {path} with fourcc {fourcc}")
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    for i, level in enumerate(levels):
        img = np.full((height, width), level * 255.0, np.float32)
        if texture:
            amp = min(level, 1.0 - level, 0.1) * 255.0
            img += amp * np.sin((x + 11 * i) / 9.0) * np.cos((y + 5 * i) / 13.0)
        frame = np.clip(img, 0, 255).astype(np.uint8)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def models_dir() -> Path:
    env = os.environ.get("KESTREL_TEST_MODELS")
    return Path(env) if env else REPO / ".cache" / "test-models"


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("mosquitto exited at start; see its log in the output dir")
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not open port {port}")


def start_mosquitto(out: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("mosquitto is not installed (apt install mosquitto)")
    port = free_port()
    conf = out / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"log_dest file {out / 'mosquitto.log'}\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return proc, port


def write_config(out: Path, port: int, video: Path, model: Path, labels: Path) -> Path:
    toml = out / "edge.toml"
    toml.write_text(f"""[device]
id = "{DEVICE_ID}"
data_dir = "{out / 'data'}"

[source]
kind = "file"
uri = "{video}"
name = "demo-video"

[model]
path = "{model}"
labels = "{labels}"
threads = 1

[sampler]
strategies = ["confidence", "margin"]
confidence_threshold = 0.6
max_per_minute = 1000
dedup_distance = 2

[mqtt]
host = "127.0.0.1"
port = {port}

[telemetry]
interval_s = 0
metrics_port = 0

[update]
enabled = false
""")
    return toml


class _Subscriber:
    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.payloads: List[bytes] = []
        self._ready = threading.Event()
        try:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        except AttributeError:  # paho < 2
            self.client = mqtt.Client()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = lambda c, u, m: self.payloads.append(bytes(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("demo subscriber could not subscribe")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--out", type=Path, required=True, help="working directory (created)")
    args = ap.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = models_dir()
    model = models / "brightness_int8.tflite"
    if not model.exists():
        print(f"demo: no test model {model}: run `python -m tests.helpers.models` (needs TensorFlow) "
              "or set KESTREL_TEST_MODELS", file=sys.stderr)
        return 2
    from proto import kestrel_pb2, topics

    levels = [0.9, 0.5, 0.9, 0.45, 0.1, 0.55, 0.95, 0.5, 0.15, 0.4] * 4
    video = write_video(out / "demo.avi", levels)
    broker, port = start_mosquitto(out)
    sub: Optional[Any] = None
    try:
        sub = _Subscriber(port, topics.frames(DEVICE_ID))
        toml = write_config(out, port, video, model, models / "labels.txt")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        print(f"demo: broker 127.0.0.1:{port}, {len(levels)} frames, config {toml}")
        proc = subprocess.run([sys.executable, "-m", "edge", "run", "--config", str(toml)], env=env,
                              cwd=str(out), timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
        (out / "daemon.log").write_text(proc.stderr)
        if proc.returncode != 0:
            print(f"demo: daemon exited {proc.returncode}; last lines:\n" + "\n".join(
                proc.stderr.splitlines()[-5:]), file=sys.stderr)
        deadline = time.monotonic() + 3.0
        expected = [ln for ln in proc.stderr.splitlines() if "summary" in ln]
        while time.monotonic() < deadline and not sub.payloads:
            time.sleep(0.05)
        frames = []
        for p in list(sub.payloads):
            f = kestrel_pb2.Frame()
            f.ParseFromString(p)
            frames.append(f)
        print(f"demo: {len(frames)} frames arrived on {topics.frames(DEVICE_ID)}")
        for f in frames[:5]:
            reasons = ",".join(kestrel_pb2.SampleReason.Name(r) for r in f.reasons)
            top = " ".join(f"{t.label}={t.score:.2f}" for t in f.top_k)
            print(f"  {f.frame_id}  seq={f.sequence}  {f.width}x{f.height} {f.image_bytes}B  "
                  f"[{reasons}]  {top}")
        if expected:
            print("demo: daemon " + expected[-1].split("summary", 1)[1].strip())
        return 0 if frames and proc.returncode == 0 else 1
    finally:
        if sub is not None:
            sub.close()
        broker.terminate()
        broker.wait(5)


if __name__ == "__main__":
    sys.exit(main())
