"""The Jetson specifics of the daemon (Python 3.8 too): GStreamer camera presets, interpreter threads from
the CPU affinity, secrets from systemd's $CREDENTIALS_DIRECTORY."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge import config, credentials
from edge.config import SourceConfig
from edge.sources import open_source
from edge.sources.gstreamer import gst_element_exists, preset_pipeline, preset_problems
from tests.edge.test_daemon import daemon_cmd, env, summary, write_toml

JETSON = {"nvarguscamerasrc", "nvvidconv", "nvv4l2decoder", "v4l2src", "jpegdec", "videotestsrc"}


def on_jetson(name: str) -> bool:
    return name in JETSON


def on_desktop(name: str) -> bool:
    return name in {"v4l2src", "jpegdec", "videotestsrc"}


def src(preset: str, uri: str = "", **kw: object) -> SourceConfig:
    fields = dict(kind="gstreamer", preset=preset, uri=uri, width=1280, height=720, fps=30)
    fields.update(kw)
    return config.from_dict({"source": fields}).source


def test_csi_preset_goes_through_argus_and_the_vic() -> None:
    assert preset_pipeline(src("csi"), on_jetson) == (
        "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1 ! "
        "nvvidconv ! video/x-raw,format=BGRx")
    assert "sensor-id=1 " in preset_pipeline(src("csi", "1"), on_jetson)
    assert "framerate=31/2 " in preset_pipeline(src("csi", fps=15.5), on_jetson)
    assert "framerate" not in preset_pipeline(src("csi", fps=0), on_jetson)
    assert preset_problems(src("csi"), on_jetson) == []
    missing = preset_problems(src("csi"), on_desktop)
    assert len(missing) == 2 and "nvarguscamerasrc" in missing[0] and "nvvidconv" in missing[1]


def test_usb_presets_use_hardware_conversion_where_it_exists() -> None:
    assert preset_pipeline(src("usb"), on_jetson) == (
        "v4l2src device=/dev/video0 ! video/x-raw,width=1280,height=720,framerate=30/1 ! nvvidconv ! "
        "video/x-raw,format=BGRx")
    assert preset_pipeline(src("usb", "/dev/video2"), on_desktop) == (
        "v4l2src device=/dev/video2 ! video/x-raw,width=1280,height=720,framerate=30/1")  # videoconvert follows
    assert preset_pipeline(src("usb-mjpeg"), on_jetson).endswith(
        "image/jpeg,width=1280,height=720,framerate=30/1 ! nvv4l2decoder mjpeg=1 ! nvvidconv ! "
        "video/x-raw,format=BGRx")
    assert preset_pipeline(src("usb-mjpeg"), on_desktop).endswith("! jpegdec")
    assert preset_problems(src("usb-mjpeg"), on_desktop) == []
    assert "v4l2src" in preset_problems(src("usb"), lambda name: False)[0]


def test_element_detection_asks_gst_inspect(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A stand-in gst-inspect-1.0 that knows nvvidconv (as JetPack's does) switches the usb preset to it."""
    fake = tmp_path / "gst-inspect-1.0"
    fake.write_text('#!/bin/sh\n[ "$1" = --exists ] && [ "$2" = nvvidconv ]\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gst_element_exists.cache_clear()
    try:
        assert gst_element_exists("nvvidconv") and not gst_element_exists("videotestsrc")
        assert "! nvvidconv !" in preset_pipeline(src("usb"))
    finally:
        gst_element_exists.cache_clear()


def test_test_preset_runs_through_the_daemon(tmp_path: Path, models_dir: Path, gst: str) -> None:  # noqa: ANN001
    body = ('[source]\nkind = "gstreamer"\npreset = "test"\nname = "bench"\nwidth = 64\nheight = 48\nfps = 60\n'
            'max_frames = 10\n\n[pipeline]\ndrop_policy = "block"')
    toml = write_toml(tmp_path, "cam-preset", 1, body, models_dir)
    toml.write_text(toml.read_text().replace('host = "127.0.0.1"', 'host = ""'))
    run = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "GStreamer preset test: videotestsrc is-live=true pattern=ball ! video/x-raw,width=64,height=48" \
        in run.stderr
    s = summary(run.stderr)
    assert s["captured"] == s["processed"] == 10 and s["corrupt"] == 0
    assert open_source(src("test")).command()[2:4] == ["videotestsrc", "is-live=true"]


def test_csi_preset_off_a_jetson_is_one_line_at_check_config(tmp_path: Path, models_dir: Path, gst: str) -> None:  # noqa: ANN001,E501
    toml = write_toml(tmp_path, "cam-csi", 1, '[source]\nkind = "gstreamer"\npreset = "csi"', models_dir)
    run = subprocess.run(daemon_cmd(toml, "--check-config"), env=env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("kestrel-edge run: error:")]
    assert len(errors) == 1 and "source.preset csi needs the GStreamer element nvarguscamerasrc" in errors[0]


AFFINITY = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from edge import config; print(config.load(None).model.resolved_threads, "
            "config.from_dict({'model': {'threads': 3}}).model.resolved_threads)")


def test_threads_default_to_the_cores_this_process_may_use(tmp_path: Path, models_dir: Path) -> None:
    cfg = config.load(None)
    assert cfg.model.threads == 0 and cfg.model.resolved_threads == len(os.sched_getaffinity(0))
    pinned = subprocess.run([sys.executable, "-c", AFFINITY], env=env(), capture_output=True, text=True, timeout=60)
    assert pinned.stdout.split() == ["1", "3"], pinned.stderr  # one core allowed: one thread; explicit wins
    # the daemon loads its interpreter with them: run it pinned to one core (taskset-like) and read its log
    toml = write_toml(tmp_path, "cam-threads", 1, '[source]\nkind = "testpattern"\nmax_frames = 3\nfps = 0',
                      models_dir)
    toml.write_text(toml.read_text().replace("threads = 1\n", "").replace('host = "127.0.0.1"', 'host = ""'))
    one = min(os.sched_getaffinity(0))
    run = subprocess.run(daemon_cmd(toml), env=env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert run.returncode == 0, run.stderr[-2000:]
    assert ", 1 threads) on source" in run.stderr


def test_relative_secret_names_are_read_from_the_credentials_directory(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001,E501
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    (creds / "mqtt-password").chmod(0o600)  # a secret everyone may read is refused (tests/edge/test_desired_signing.py)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(credentials.CREDENTIALS_ENV, raising=False)
    assert credentials.credential_path("mqtt-password") == "mqtt-password"  # no systemd: as given (relative to cwd)
    monkeypatch.setenv(credentials.CREDENTIALS_ENV, str(creds))
    assert credentials.credential_path("mqtt-password") == str(creds / "mqtt-password")
    assert credentials.read_secret("mqtt-password") == "s3cret"
    assert credentials.credential_path("/etc/kestrel/credentials/device.key") == "/etc/kestrel/credentials/device.key"
    assert credentials.credential_path("device.key") == "device.key"  # not among the credentials: unchanged
    with pytest.raises(Exception, match="cannot read secret file device.key"):
        credentials.read_secret("device.key")
