"""``kestrel-edge run`` with four cameras: a real daemon process on two video files, the test pattern and a real
RTSP camera, real Mosquitto; the RTSP camera dies and comes back while the other three go on."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Dict, Optional

import cv2
import numpy as np
import pytest

from demo.edge import write_video
from proto import kestrel_pb2 as pb
from proto import topics
from tests.edge.test_daemon import daemon_cmd, env, parse, summary
from tests.helpers.broker import free_port
from tests.helpers.mqtt import Collector
from tests.helpers.rtsp import RtspCamera
from tests.helpers.wait import wait_for

# every source has its own frame size, so a frame message's image says which camera took it
SIZES = {"left": (160, 120), "right": (256, 192), "pattern": (96, 72), "door": (320, 240)}
LEVELS = {"left": 0.3, "right": 0.7, "pattern": 0.5}  # mean brightness of the files and the pattern



def four_sources_toml(tmp: Path, device: str, broker_port: int, metrics_port: int, rtsp_url: str,
                      models_dir: Path) -> Path:
    left = write_video(tmp / "left.avi", [LEVELS["left"]] * 20, *SIZES["left"], fps=10.0)
    right = write_video(tmp / "right.avi", [LEVELS["right"]] * 20, *SIZES["right"], fps=10.0)
    toml = tmp / "edge.toml"
    toml.write_text(f"""[device]
id = "{device}"
data_dir = "{tmp / 'data'}"

[[sources]]
name = "left"
kind = "file"
uri = "{left}"
loop = true
realtime = true

[[sources]]
name = "right"
kind = "file"
uri = "{right}"
loop = true
realtime = true

[[sources]]
name = "pattern"
kind = "testpattern"
width = {SIZES['pattern'][0]}
height = {SIZES['pattern'][1]}
fps = 10
pattern_brightness = [{LEVELS['pattern']}]

[[sources]]
name = "door"
kind = "rtsp"
uri = "{rtsp_url}"
reconnect_initial_s = 0.1
reconnect_max_s = 0.4
stall_timeout_s = 2.0

[model]
path = "{models_dir / 'brightness_int8.tflite'}"
labels = "{models_dir / 'labels.txt'}"
threads = 1

[sampler]
confidence_threshold = 1.0
dedup_distance = -1
max_per_minute = 0
max_per_hour = 0
max_per_day = 0

[mqtt]
host = "127.0.0.1"
port = {broker_port}
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[telemetry]
interval_s = 0.5
metrics_port = {metrics_port}

[update]
enabled = false
""")
    return toml


def frames_by_source(col: Collector) -> Counter:
    return Counter(f.source for f in parse(col.payloads("/frames")))


def source_up(metrics_port: int) -> Dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("kestrel_edge_source_up{"):
            name = line.split('source="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def test_four_cameras_one_daemon_one_dies_and_comes_back(tmp_path: Path, broker, models_dir: Path,  # noqa: ANN001
                                                        camera: RtspCamera) -> None:
    device = "cam-four"
    metrics_port = free_port()
    toml = four_sources_toml(tmp_path, device, broker.port, metrics_port, camera.url, models_dir)
    col = Collector(broker.host, broker.port, [topics.frames(device), topics.telemetry(device)])
    log = tmp_path / "daemon.log"
    proc: Optional[subprocess.Popen] = None
    try:
        with open(log, "w") as err:
            proc = subprocess.Popen(daemon_cmd(toml), env=env(), cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                                    stderr=err, text=True)

        def alive() -> None:
            assert proc is not None and proc.poll() is None, log.read_text()[-3000:]

        def every_source(n: int) -> bool:
            alive()
            got = frames_by_source(col)
            return all(got[name] >= n for name in SIZES)

        wait_for(lambda: every_source(5), 60, what="5 frames of every camera")
        camera.stop()  # the RTSP camera dies; the daemon reconnects with backoff, the others go on
        wait_for(lambda: source_up(metrics_port).get("door") == 0.0, 30, what="door reported down")
        during = frames_by_source(col)
        wait_for(lambda: all(frames_by_source(col)[n] >= during[n] + 10 for n in LEVELS), 60,
                 what="10 more frames of each other camera while the door camera is down")
        alive()
        assert frames_by_source(col)["door"] <= during["door"] + 12  # at most what was queued or in flight
        assert source_up(metrics_port) == {"left": 1.0, "right": 1.0, "pattern": 1.0, "door": 0.0}
        camera.start()  # back on the same address
        back = frames_by_source(col)["door"]
        wait_for(lambda: frames_by_source(col)["door"] >= back + 5, 60, what="door frames again")
        wait_for(lambda: source_up(metrics_port).get("door") == 1.0, 30, what="door reported up")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        wait_for(lambda: len(col.payloads("/telemetry")) >= 2, 15, what="telemetry")
        frames = parse(col.payloads("/frames"))
        telemetry = []
        for payload in col.payloads("/telemetry"):
            t = pb.Telemetry()
            t.ParseFromString(payload)
            telemetry.append(t)
    finally:
        col.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "on sources left (file), right (file), pattern (testpattern), door (rtsp)" in err
    s = summary(err)
    per = s["sources"]
    assert sorted(per) == sorted(SIZES)
    assert all(per[n]["processed"] > 0 and per[n]["sampled"] == per[n]["processed"] for n in per)
    assert sum(c["processed"] for c in per.values()) == s["processed"] == s["sampled"]
    assert per["door"]["reconnects"] >= 1 and all(per[n]["reconnects"] == 0 for n in LEVELS)
    assert s["errors"] == s["sink_errors"] == 0
    # every frame message is its camera's image: its size, and for the files and the pattern its brightness
    for f in frames:
        assert (f.width, f.height) == SIZES[f.source], f.source
        if f.source in LEVELS:
            img = cv2.imdecode(np.frombuffer(f.image, np.uint8), cv2.IMREAD_GRAYSCALE)
            assert abs(float(img.mean()) / 255 - LEVELS[f.source]) < 0.06, f.source
    ids: Dict[str, str] = {}
    for f in frames:  # frame numbers count over every camera: an id names one camera's frame (resent ones too)
        assert ids.setdefault(f.frame_id, f.source) == f.source
    last = telemetry[-1]
    assert sorted(x.name for x in last.sources) == sorted(SIZES)
    assert sum(x.frames_processed for x in last.sources) == last.frames_processed
    assert next(x for x in last.sources if x.name == "door").reconnects >= 1


@pytest.mark.parametrize("sources, code, message", [
    ('[[sources]]\nname = "a"\n\n[[sources]]\nname = "b"\nkind = "testpattern"', 0,
     "OK (device cam-cfg, sources a (testpattern), b (testpattern)"),
    ('[source]\nkind = "testpattern"\n\n[[sources]]\nname = "a"', 2, "give either [source] (one camera) or "
                                                                    "[[sources]] (several), not both"),
    ('[[sources]]\nname = "a"\n\n[[sources]]\nname = "a"', 2, "two [[sources]] are named 'a'"),
    ('[[sources]]\nname = "a"\n\n[[sources]]\nname = "gone"\nkind = "file"\nuri = "/nonexistent/x.avi"', 2,
     "sources[1] (gone).uri: video file /nonexistent/x.avi does not exist"),
])
def test_check_config_checks_every_source(tmp_path: Path, models_dir: Path, sources: str, code: int,
                                          message: str) -> None:
    toml = tmp_path / "edge.toml"
    toml.write_text(f'[device]\nid = "cam-cfg"\ndata_dir = "{tmp_path / "data"}"\n\n{sources}\n\n[model]\n'
                    f'path = "{models_dir / "brightness_int8.tflite"}"\n')
    res = subprocess.run(daemon_cmd(toml, "--check-config"), env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == code, res.stderr[-2000:]
    if code == 0:
        assert message in res.stdout
    else:
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kestrel-edge run: error:")]
        assert len(errors) == 1 and message in errors[0], res.stderr[-2000:]
        assert "Traceback" not in res.stderr
