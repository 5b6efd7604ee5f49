"""``kestrel-edge run`` end to end: a real daemon process, real Mosquitto, real model and video."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np
import pytest

from demo.edge import write_video
from proto import kestrel_pb2 as pb
from proto import topics
from tests.helpers.broker import free_port
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
LABELS = ["bright", "dark", "mid"]
NO_LIMITS = "dedup_distance = -1\nmax_per_minute = 0\nmax_per_hour = 0\nmax_per_day = 0"


def write_toml(tmp: Path, device: str, port: int, source: str, models_dir: Path, extra: str = "",
               model: str = "", threshold: str = "confidence_threshold = 0.6", sampler: str = NO_LIMITS,
               mqtt: str = "") -> Path:
    toml = tmp / "edge.toml"
    model = model or (f'path = "{models_dir / "brightness_int8.tflite"}"\n'
                      f'labels = "{models_dir / "labels.txt"}"')
    toml.write_text(f"""[device]
id = "{device}"
data_dir = "{tmp / 'data'}"

{source}

[model]
{model}
threads = 1

[sampler]
{threshold}
{sampler}

[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_min_s = 0.1
reconnect_max_s = 0.5
{mqtt}

[telemetry]
interval_s = 0
metrics_port = 0

{extra or "[update]"}
enabled = false
""")
    return toml


def daemon_cmd(toml: Path, *more: str) -> List[str]:
    return [sys.executable, "-m", "edge", "run", "--config", str(toml), *more]


def env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def summary(stderr: str) -> dict:
    lines = [ln for ln in stderr.splitlines() if "edge.daemon: summary " in ln]
    assert lines, f"no summary line in daemon output:\n{stderr[-2000:]}"
    return json.loads(lines[-1].split("summary ", 1)[1])


def parse(payloads: List[bytes]) -> List[pb.Frame]:
    out = []
    for p in payloads:
        f = pb.Frame()
        f.ParseFromString(p)
        out.append(f)
    return out


def test_low_confidence_frames_arrive_with_correct_fields(tmp_path, broker, models_dir):  # noqa: ANN001
    levels = [0.9, 0.5, 0.95, 0.45, 0.9, 0.55, 0.92, 0.5]
    video = write_video(tmp_path / "in.avi", levels, width=320, height=240)
    device = "cam-e2e-1"
    src = f'[source]\nkind = "file"\nuri = "{video}"\nname = "door"'
    toml = write_toml(tmp_path, device, broker.port, src, models_dir)
    col = Collector(broker.host, broker.port, [topics.frames(device)])
    try:
        t0 = time.time()
        proc = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        expected = [i + 1 for i, lv in enumerate(levels) if lv < 0.7]
        s = summary(proc.stderr)
        assert s["processed"] == len(levels) and s["sampled"] == s["spooled"] == len(expected)
        assert 0 < s["run_s"] < 60 and s["errors"] == s["sink_errors"] == 0
        frames = parse(col.wait_count(len(expected), "/frames"))
    finally:
        col.close()
    assert len(frames) == len(expected)
    sha = hashlib.sha256((models_dir / "brightness_int8.tflite").read_bytes()).hexdigest()
    seqs = []
    boot_ids = set()
    for f in frames:
        dev, boot, seq = f.frame_id.rsplit("-", 2)
        assert dev == device and f.device_id == device
        boot_ids.add(boot)
        seqs.append(int(seq))
        assert f.model.sha256 == sha and f.model.name == "brightness_int8"
        assert pb.LOW_CONFIDENCE in f.reasons
        assert [t.label for t in f.top_k] and len(f.top_k) == 3
        assert sorted(t.label for t in f.top_k) == sorted(LABELS)
        assert f.top_k[0].score < 0.6 and f.top_k[0].score >= f.top_k[1].score
        assert f.image_format == "jpeg" and f.image_bytes == len(f.image) > 0
        img = cv2.imdecode(np.frombuffer(f.image, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (f.height, f.width, 3) == (240, 320, 3)
        assert f.source == "door"
        assert t0 - 5 <= f.capture_time_ms / 1000 <= time.time() + 5
    assert seqs == expected and len(boot_ids) == 1
    assert sorted(f.sequence for f in frames) == list(range(len(frames)))


def boot_id(stderr: str, device: str) -> str:
    """The boot id the daemon logged at start ("device X boot Y: ...")."""
    marker = f"device {device} boot "
    line = next(ln for ln in stderr.splitlines() if marker in ln)
    return line.split(marker, 1)[1].split(":", 1)[0]


def first_occurrences(frames: List[pb.Frame]) -> List[pb.Frame]:
    """The frames as the hub stores them: deduplicated on frame_id, in arrival order."""
    seen = set()
    out = []
    for f in frames:
        if f.frame_id not in seen:
            seen.add(f.frame_id)
            out.append(f)
    return out


def test_sigterm_flushes_every_sampled_frame(tmp_path, broker_factory, models_dir):  # noqa: ANN001
    device = "cam-e2e-2"
    broker = broker_factory()
    src = ('[source]\nkind = "testpattern"\nwidth = 160\nheight = 120\nfps = 40\n'
           'pattern_brightness = [0.5, 0.45, 0.55]')
    toml = write_toml(tmp_path, device, broker.port, src, models_dir)
    spool = tmp_path / "data" / "spool"
    col = Collector(broker.host, broker.port, [topics.frames(device)])
    proc: Optional[subprocess.Popen] = None
    try:
        proc = subprocess.Popen(daemon_cmd(toml), env=env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        col.wait_count(5, "/frames", timeout=30)
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)  # the broker stalls: sampled frames pile up unacknowledged
        try:
            wait_for(lambda: len(list(spool.glob("*.rec"))) >= 30, 30, what="a backlog in the spool")
            proc.send_signal(signal.SIGTERM)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=30)
        arrived_at_exit = len(col.payloads("/frames"))
    finally:
        col.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    s = summary(err)
    # every frame was low confidence and nothing limits sending: every processed frame was sampled
    assert s["sampled"] == s["processed"] >= 30 and s["spooled"] == s["sampled"] and s["sink_errors"] == 0
    # flushed: the backlog went out before exit, nothing is left in the spool
    assert s["spool_frames"] == 0 and not list(spool.glob("*.rec"))
    assert s["frames_acked"] == s["sampled"]
    boot = boot_id(err, device)
    got = first_occurrences(parse(col.payloads("/frames")))
    assert [f.frame_id for f in got] == [f"{device}-{boot}-{n}" for n in range(1, s["sampled"] + 1)]
    assert arrived_at_exit >= s["sampled"]


def test_broker_down_keeps_frames_in_spool(tmp_path, models_dir):  # noqa: ANN001
    video = write_video(tmp_path / "in.avi", [0.5, 0.9, 0.45], width=64, height=48)
    src = f'[source]\nkind = "file"\nuri = "{video}"'
    toml = write_toml(tmp_path, "cam-e2e-3", free_port(), src, models_dir)
    proc = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary(proc.stderr)
    assert s["sampled"] == 2 and s["spool_frames"] == 2


def test_check_config(tmp_path, models_dir):  # noqa: ANN001
    good = write_toml(tmp_path, "cam-cc", 1883, '[source]\nkind = "testpattern"', models_dir)
    ok = subprocess.run(daemon_cmd(good, "--check-config"), env=env(), capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("[sampler]\n", "[sampler]\nconfidence_treshold = 0.5\n"))
    res = subprocess.run(daemon_cmd(bad, "--check-config"), env=env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kestrel-edge run: error:")]
    assert len(errors) == 1 and "confidence_treshold" in errors[0], res.stderr

    missing = tmp_path / "missing.toml"
    missing.write_text(good.read_text().replace("brightness_int8.tflite", "nope.tflite"))
    res = subprocess.run(daemon_cmd(missing, "--check-config"), env=env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "nope.tflite does not exist" in res.stderr


# --- the confidence threshold follows the running bundle's default_threshold ---------------------
def _daemon_cfg(tmp_path: Path, trust: Path, **sampler: object) -> object:
    from edge import config

    smp = {"dedup_distance": -1, "max_per_minute": 0, "max_per_hour": 0, "max_per_day": 0}
    smp.update(sampler)
    return config.from_dict({
        "device": {"id": "cam-thr", "data_dir": str(tmp_path / "data")}, "model": {"threads": 1},
        "sampler": smp, "mqtt": {"host": ""}, "telemetry": {"interval_s": 0, "metrics_port": 0},
        "update": {"trust_dir": str(trust), "trial_frames": 0, "trial_seconds": 0.0}})


def _sampled_mid_frames(daemon, n: int = 6) -> int:  # noqa: ANN001
    """Real inferences of mid-brightness frames (top score ~1/3..0.5) through the daemon's sampler."""
    model = daemon.holder.get()
    sent = 0
    for i in range(n):
        level = 0.45 + 0.02 * i
        scores = model.infer(np.full((48, 64, 3), int(level * 255), np.uint8))
        assert 0.3 < float(scores.max()) < 0.9  # the model really is unsure here
        sent += daemon.sampler.decide(scores).send
    return sent


def test_bundle_default_threshold_is_followed_across_swaps(tmp_path, models_dir):  # noqa: ANN001
    from edge.daemon import Daemon
    from tests.edge.test_updater import bundle
    from tests.helpers.bundles import make_keypair

    kp = make_keypair(tmp_path)
    daemon = Daemon(_daemon_cfg(tmp_path, kp.pub_path))
    try:
        assert daemon.sampler.confidence_threshold == 0.6 and not daemon.sampler.threshold_from_config
        assert daemon.updater.install_bytes(bundle(models_dir, kp, 1, default_threshold=0.3))
        assert daemon.sampler.confidence_threshold == 0.3
        assert daemon.status("online").confidence_threshold == pytest.approx(0.3)  # reported to the hub
        assert _sampled_mid_frames(daemon) == 0
        assert daemon.stats.model is not None and daemon.stats.model.version == 1  # telemetry follows swaps
        assert daemon.updater.install_bytes(bundle(models_dir, kp, 2, default_threshold=0.9))  # hot swap
        assert daemon.holder.get().ref.version == 2 and daemon.stats.model.version == 2
        assert daemon.sampler.confidence_threshold == 0.9
        assert daemon.status("online").confidence_threshold == pytest.approx(0.9)
        assert _sampled_mid_frames(daemon) == 6
    finally:
        daemon.updater.stop()
        daemon.holder.get().close()


def test_configured_threshold_wins_over_the_bundle_default(tmp_path, models_dir):  # noqa: ANN001
    from edge.daemon import Daemon
    from tests.edge.test_updater import bundle
    from tests.helpers.bundles import make_keypair

    kp = make_keypair(tmp_path)
    daemon = Daemon(_daemon_cfg(tmp_path, kp.pub_path, confidence_threshold=0.3))
    try:
        assert daemon.updater.install_bytes(bundle(models_dir, kp, 1, default_threshold=0.9))
        assert daemon.sampler.threshold_from_config and daemon.sampler.confidence_threshold == 0.3
        assert daemon.status("online").confidence_threshold == pytest.approx(0.3)
        assert _sampled_mid_frames(daemon) == 0
    finally:
        daemon.updater.stop()
        daemon.holder.get().close()


# --- model.path may be a signed bundle ---------------------------------------------------------------
def test_model_path_bundle_is_installed_then_booted(tmp_path, models_dir):  # noqa: ANN001
    from tests.edge.test_updater import bundle
    from tests.helpers.bundles import make_keypair

    kp = make_keypair(tmp_path)
    path = tmp_path / "brightness-v3.kbundle"
    path.write_bytes(bundle(models_dir, kp, 3, default_threshold=0.9))
    levels = [0.5, 0.95, 0.45, 0.9, 0.55]
    video = write_video(tmp_path / "in.avi", levels, width=64, height=48)
    toml = write_toml(tmp_path, "cam-kb", free_port(), f'[source]\nkind = "file"\nuri = "{video}"', models_dir,
                      model=f'path = "{path}"', threshold="",
                      extra=f'[update]\ntrust_dir = "{kp.pub_path.parent}"\ntrial_frames = 0\ntrial_seconds = 0')
    first = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr[-2000:]
    s = summary(first.stderr)
    assert s["confidence_threshold"] == 0.9  # the bundle's default, no threshold in the config
    assert s["processed"] == len(levels) and s["sampled"] == sum(lv < 0.7 for lv in levels)
    slot = json.loads((tmp_path / "data" / "slots" / "a" / "slot.json").read_text())
    assert slot["version"] == 3 and slot["default_threshold"] == 0.9
    # the second start boots the installed slot (model.path is not installed again)
    second = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "ignored: a model is installed" in second.stderr
    assert summary(second.stderr)["processed"] == len(levels)


def test_refused_model_path_bundle_is_one_clear_error(tmp_path, models_dir):  # noqa: ANN001
    from tests.edge.test_updater import bundle
    from tests.helpers.bundles import make_keypair

    trusted = make_keypair(tmp_path, "trusted")
    stranger = make_keypair(tmp_path, "stranger")
    path = tmp_path / "evil.kbundle"
    path.write_bytes(bundle(models_dir, stranger, 1))
    toml = write_toml(tmp_path, "cam-kb2", free_port(), '[source]\nkind = "testpattern"', models_dir,
                      model=f'path = "{path}"', extra=f'[update]\ntrust_dir = "{trusted.pub_path.parent}"')
    res = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kestrel-edge run: error:")]
    assert len(errors) == 1, res.stderr
    assert str(path) in errors[0] and "bundle refused" in errors[0], errors[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data" / "slots" / "a" / "slot.json").exists()


# --- shutdown: nothing lost, nothing hangs ----------------------------------------------------------
def _start_spooling_daemon(tmp_path: Path, models_dir: Path, port: int, device: str) -> subprocess.Popen:
    src = ('[source]\nkind = "testpattern"\nwidth = 64\nheight = 48\nfps = 40\n'
           'pattern_brightness = [0.5, 0.45, 0.55]')
    toml = write_toml(tmp_path, device, port, src, models_dir)
    proc = subprocess.Popen(daemon_cmd(toml), env=env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    spool = tmp_path / "data" / "spool"
    wait_for(lambda: len(list(spool.glob("*.rec"))) >= 3 or proc.poll() is not None, 30,
             what="sampled frames in the spool")
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    return proc


def test_sigterm_with_broker_down_keeps_frames_and_delivers_them_later(tmp_path, models_dir,  # noqa: ANN001
                                                                       broker_factory):
    port = free_port()
    device = "cam-down"
    proc = _start_spooling_daemon(tmp_path, models_dir, port, device)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)  # prompt: no wait for a broker that is not there
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    s = summary(err)
    assert s["sampled"] >= 3 and s["spooled"] == s["sampled"] == s["spool_frames"] and s["sink_errors"] == 0
    # next start, broker up: the spooled frames go out (the new run itself samples nothing). The camera
    # keeps running (a looped video) until they have arrived, so no shutdown flush deadline is involved.
    broker = broker_factory(port=port)
    col = Collector(broker.host, broker.port, [topics.frames(device)])
    again = None
    try:
        video = write_video(tmp_path / "bright.avi", [0.9, 0.95], width=64, height=48)
        toml = write_toml(tmp_path, device, port,
                          f'[source]\nkind = "file"\nuri = "{video}"\nloop = true\nrealtime = true', models_dir)
        again = subprocess.Popen(daemon_cmd(toml), env=env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        frames = parse(col.wait_count(s["spool_frames"], "/frames", timeout=60))
        again.send_signal(signal.SIGTERM)
        _, err2 = again.communicate(timeout=30)
    finally:
        col.close()
        if again is not None and again.poll() is None:
            again.kill()
            again.wait()
    assert again.returncode == 0, err2[-2000:]
    assert summary(err2)["sampled"] == 0
    assert len({f.frame_id for f in frames}) == s["spool_frames"]


def test_second_sigterm_skips_the_wait_and_loses_no_sampled_frame(tmp_path, models_dir):  # noqa: ANN001
    proc = _start_spooling_daemon(tmp_path, models_dir, free_port(), "cam-twice")
    try:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    s = summary(err)
    assert s["spooled"] == s["sampled"] == s["spool_frames"] >= 3
    assert "Traceback" not in err


# --- the broker lost while frames are in flight, the daemon restarted in between ---------------------
def test_broker_lost_mid_run_then_daemon_restarted_every_frame_once_in_order(tmp_path, models_dir,  # noqa: ANN001
                                                                           broker_factory):
    """At-least-once on the wire, exactly once after the hub's dedup on frame_id, always in order.

    Run 1 sends frames live; the broker then hangs (SIGSTOP: frames sent, never acknowledged) and
    dies (SIGKILL) while the daemon keeps sampling into the spool; run 1 is stopped with SIGTERM.
    The broker comes back (empty: no persistence), a subscriber re-subscribes, and run 2 (a file)
    first resends what run 1 left, then its own frames."""
    device = "cam-outage"
    b = broker_factory()
    spool = tmp_path / "data" / "spool"
    src1 = ('[source]\nkind = "testpattern"\nwidth = 64\nheight = 48\nfps = 25\n'
            'pattern_brightness = [0.5, 0.45, 0.55]')
    toml1 = write_toml(tmp_path, device, b.port, src1, models_dir, mqtt="ack_timeout_s = 1.0")
    col1 = Collector(b.host, b.port, [topics.frames(device)])
    log1 = tmp_path / "run1.log"
    proc: Optional[subprocess.Popen] = None
    try:
        with open(log1, "w") as err1:
            proc = subprocess.Popen(daemon_cmd(toml1), env=env(), cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                                    stderr=err1, text=True)
        col1.wait_count(5, "/frames", timeout=30)
        assert b.proc is not None
        os.kill(b.proc.pid, signal.SIGSTOP)
        wait_for(lambda: "no PUBACK" in log1.read_text(), 20, what="the daemon noticed missing PUBACKs")
        b.proc.kill()  # dies with unacknowledged frames in flight
        b.proc.wait(10)
        records = len(list(spool.glob("*.rec")))
        wait_for(lambda: len(list(spool.glob("*.rec"))) >= records + 5, 20, what="more frames spooled offline")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        col1.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log1.read_text()
    assert proc.returncode == 0, err[-2000:]
    s1 = summary(err)
    assert s1["spool_frames"] > 5 and s1["sampled"] == s1["spooled"] == s1["processed"]
    boot1 = boot_id(err, device)

    b.start()
    col2 = Collector(b.host, b.port, [topics.frames(device)])
    try:
        levels = [0.5, 0.45, 0.55, 0.5]
        video = write_video(tmp_path / "run2.avi", levels, width=64, height=48)
        toml2 = write_toml(tmp_path, device, b.port, f'[source]\nkind = "file"\nuri = "{video}"', models_dir)
        run2 = subprocess.run(daemon_cmd(toml2), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                              timeout=60)
        assert run2.returncode == 0, run2.stderr[-2000:]
        s2 = summary(run2.stderr)
        assert s2["spool_frames"] == 0 and s2["sampled"] == len(levels)
        boot2 = boot_id(run2.stderr, device)
        total = s1["sampled"] + s2["sampled"]
        col2.wait_count(s1["spool_frames"] + s2["sampled"], "/frames", timeout=30)
        frames = parse(col1.payloads("/frames") + col2.payloads("/frames"))
    finally:
        col2.close()
    stored = first_occurrences(frames)
    expected = ([f"{device}-{boot1}-{n}" for n in range(1, s1["sampled"] + 1)]
                + [f"{device}-{boot2}-{n}" for n in range(1, s2["sampled"] + 1)])
    assert [f.frame_id for f in stored] == expected  # nothing lost, nothing reordered
    assert [f.sequence for f in stored] == list(range(total))
    # duplicates on the wire are only frames that were in flight when the link broke
    assert len(frames) - len(stored) <= 20


# --- rate limits and near-duplicate suppression, through the daemon and a real broker -------------------
def blocky_video(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` different random blocky scenes of mean brightness ~0.5 (all low confidence, all far apart
    in perceptual hash)."""
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (160, 120))
    for _ in range(n):
        small = rng.integers(60, 196, (12, 16, 3), dtype=np.uint8)
        writer.write(np.kron(small, np.ones((10, 10, 1), np.uint8)))
    writer.release()
    return path


def test_static_scene_is_sent_once(tmp_path, broker, models_dir):  # noqa: ANN001
    device = "cam-static"
    video = write_video(tmp_path / "static.avi", [0.5] * 30, width=160, height=120, texture=False)
    toml = write_toml(tmp_path, device, broker.port, f'[source]\nkind = "file"\nuri = "{video}"', models_dir,
                      sampler="dedup_distance = 6\nmax_per_minute = 0\nmax_per_hour = 0\nmax_per_day = 0")
    col = Collector(broker.host, broker.port, [topics.frames(device)])
    try:
        run = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr[-2000:]
        s = summary(run.stderr)
        assert s["processed"] == 30 and s["sampler"]["low_confidence"] == 30
        assert s["sampled"] == 1 and s["sampler"]["duplicate"] == 29 and s["frames_acked"] == 1
        frames = parse(col.wait_count(1, "/frames"))
    finally:
        col.close()
    assert [f.frame_id for f in frames] == [f"{device}-{boot_id(run.stderr, device)}-1"]


def test_rate_limit_holds_and_survives_a_restart(tmp_path, broker, models_dir):  # noqa: ANN001
    device = "cam-rate"
    video = blocky_video(tmp_path / "scenes.avi", 12)
    toml = write_toml(tmp_path, device, broker.port, f'[source]\nkind = "file"\nuri = "{video}"', models_dir,
                      sampler="dedup_distance = 6\nmax_per_minute = 4\nmax_per_hour = 0\nmax_per_day = 0")
    col = Collector(broker.host, broker.port, [topics.frames(device)])
    try:
        first = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                               timeout=60)
        assert first.returncode == 0, first.stderr[-2000:]
        s = summary(first.stderr)
        assert s["sampler"]["low_confidence"] == 12 and s["sampler"]["duplicate"] == 0
        assert s["sampled"] == 4 and s["sampler"]["rate_limited"] == 8 and s["frames_acked"] == 4
        frames = parse(col.wait_count(4, "/frames"))
        boot = boot_id(first.stderr, device)
        assert [f.frame_id for f in frames] == [f"{device}-{boot}-{n}" for n in range(1, 5)]
        # a restart within the minute (a crash loop) does not get a fresh budget
        second = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 0, second.stderr[-2000:]
        s2 = summary(second.stderr)
        assert s2["sampled"] == 0 and s2["sampler"]["rate_limited"] == 12
        assert "4 frames sent in the last minute count against the rate limits" in second.stderr
        assert len(col.payloads("/frames")) == 4
    finally:
        col.close()


# --- the GStreamer source through `kestrel-edge run` ----------------------------------------------------
def test_gstreamer_source_through_the_daemon(tmp_path, broker, models_dir, gst):  # noqa: ANN001
    device = "cam-gst"
    src = ('[source]\nkind = "gstreamer"\nname = "csi-sim"\nwidth = 96\nheight = 72\n'
           'uri = "videotestsrc num-buffers=12 pattern=solid-color foreground-color=0xff808080"\n\n'
           '[pipeline]\ndrop_policy = "block"')  # videotestsrc runs faster than a camera: count every frame
    toml = write_toml(tmp_path, device, broker.port, src, models_dir)
    col = Collector(broker.host, broker.port, [topics.frames(device)])
    try:
        run = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr[-2000:]
        s = summary(run.stderr)
        assert s["captured"] == s["processed"] == s["sampled"] == 12 and s["corrupt"] == 0
        frames = parse(col.wait_count(12, "/frames"))
    finally:
        col.close()
    assert all(f.source == "csi-sim" and (f.width, f.height) == (96, 72) for f in frames)
    img = cv2.imdecode(np.frombuffer(frames[0].image, np.uint8), cv2.IMREAD_COLOR)
    assert abs(float(img.mean()) - 128) < 8  # the grey videotestsrc made, not a blank buffer


# --- bad input: one line, exit 2, no traceback ------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (('id = "cam-cc"', 'id = "$dev"'), "invalid id '$dev'"),
    (('id = "cam-cc"', 'id = "cam-cc"\ngroup = "a/b"'), "invalid group 'a/b'"),
    (("metrics_port = 0", "metrics_port = 70000"), "metrics_port must be 0..65535"),
    (("interval_s = 0", "interval_s = -1"), "interval_s must be >= 0"),
    (("[update]", "[spool]\nmax_frames = 0\n\n[update]"), "max_frames must be > 0"),
    (("port = ", "ack_timeout_s = 0\nport = "), "ack_timeout_s must be > 0"),
    (("port = ", "password_file = \"/nonexistent/pw\"\nport = "), "mqtt.password_file: /nonexistent/pw"),
    (("max_per_hour = 0", "max_per_hour = -3"), "max_per_hour must be >= 0"),
])
def test_bad_config_is_one_line(tmp_path, models_dir, edit, message):  # noqa: ANN001
    good = write_toml(tmp_path, "cam-cc", 1883, '[source]\nkind = "testpattern"', models_dir)
    text = good.read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    for extra in (["--check-config"], []):
        res = subprocess.run(daemon_cmd(bad, *extra), env=env(), capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr[-2000:]
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kestrel-edge run: error:")]
        assert len(errors) == 1 and message in errors[0], res.stderr[-2000:]
        assert "Traceback" not in res.stderr


def test_unusable_data_dir_and_broken_model_are_one_line(tmp_path, models_dir):  # noqa: ANN001
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    good = write_toml(tmp_path, "cam-dd", 1883, '[source]\nkind = "testpattern"', models_dir)
    bad_dir = tmp_path / "bad-dir.toml"
    bad_dir.write_text(good.read_text().replace(f'data_dir = "{tmp_path / "data"}"',
                                                f'data_dir = "{blocker / "data"}"'))
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"TFL3" + bytes(range(256)) * 4)
    bad_model = tmp_path / "bad-model.toml"
    bad_model.write_text(good.read_text().replace(str(models_dir / "brightness_int8.tflite"), str(garbage)))
    cases = [(bad_dir, ["--check-config"], f"device.data_dir: {blocker / 'data'}"),
             (bad_dir, [], f"{blocker} is not a directory"),
             (bad_model, ["--check-config"], "is not a loadable TFLite model"),
             (bad_model, [], "is not a loadable TFLite model")]
    for toml, extra, message in cases:
        res = subprocess.run(daemon_cmd(toml, *extra), env=env(), cwd=str(tmp_path), capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 2, res.stderr[-2000:]
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kestrel-edge run: error:")]
        assert len(errors) == 1 and message in errors[0], (extra, res.stderr[-2000:])
        assert "Traceback" not in res.stderr


def test_a_fresh_device_without_a_model_waits_for_the_hub_and_stops_cleanly(tmp_path, broker):  # noqa: ANN001
    """A freshly flashed device (no slot, no model.path) stays up, reports itself online with no model and
    listens for the hub's desired state; SIGTERM ends it with exit 0 before any camera was opened."""
    device = "cam-fresh-1"
    src = '[source]\nkind = "rtsp"\nuri = "rtsp://127.0.0.1:1/never-opened"'
    toml = write_toml(tmp_path, device, broker.port, src, tmp_path, model='path = ""',
                      extra=f'[update]\nhub_grpc = "127.0.0.1:1"\ntrust_dir = "{tmp_path}"')
    toml.write_text(toml.read_text().replace("enabled = false", "enabled = true"))  # follow the hub
    col = Collector(broker.host, broker.port, [topics.status(device)])
    proc = subprocess.Popen(daemon_cmd(toml), env=env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def online() -> Optional[pb.Status]:
            for p in col.payloads("/status"):
                st = pb.Status()
                st.ParseFromString(p)
                if st.state == "online":
                    return st
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            return None

        st = wait_for(online, 30, what="the device's birth message")
        assert not st.model.name and st.model.version == 0  # no model yet
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        col.close()
    assert proc.returncode == 0, err[-2000:]
    assert "waiting for the hub to deploy one" in err and "stopping before a first model arrived" in err
    assert "never-opened" not in err  # the source is opened only once a model runs


def test_no_model_and_no_hub_is_a_one_line_config_error(tmp_path, broker):  # noqa: ANN001
    src = '[source]\nkind = "testpattern"'
    toml = write_toml(tmp_path, "cam-fresh-2", broker.port, src, tmp_path, model='path = ""')  # updates off
    proc = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no model: nothing is installed" in proc.stderr and "Traceback" not in proc.stderr
