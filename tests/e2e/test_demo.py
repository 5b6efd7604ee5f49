"""``make demo`` end to end (about a minute and a half): train, sign, push, deploy to a fresh device,
frames back, label, export, retrain, update, rollback, shutdown - every part as the real program."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.needs_tf, pytest.mark.timeout(600)]


def test_demo_closes_the_loop_and_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-m", "demo", "--out", str(out)], cwd=str(REPO), env=env,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "loop closed in" in r.stdout
    fig = json.loads((out / "demo.json").read_text())["figures"]
    assert fig["labelled"] >= 40 and fig["exported"] == fig["labelled"]
    assert fig["frames_stored"] == fig["frames_sent"] > 0
    assert 0.5 < fig["camera_accuracy"]["v1"] <= 1.0 and 0.5 < fig["camera_accuracy"]["v2"] <= 1.0
    for bundle in ("runs/r1/model-v1.kbundle", "runs/r2/model-v2.kbundle"):
        assert (out / bundle).is_file()
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert len(manifest["frames"]) == fig["exported"]
    assert {f["labelled_by"] for f in manifest["frames"]} == {"demo-oracle"}
    # the demo says where the dashboard is and where its first admin token is (never the token itself)
    token_file = out / "hub-data" / "admin-token"
    assert "dashboard: http://127.0.0.1:" in r.stdout and str(token_file) in r.stdout
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip() not in r.stdout + r.stderr + (out / "hub.log").read_text()
    # ...on TLS gRPC with a token per role: the trainer's pushed, the operator's deployed and rolled back,
    # the device fetched with its own; no token file is readable by others and none is in a log
    logs = r.stdout + r.stderr + "".join((out / n).read_text() for n in ("hub.log", "edge.log", "trainer.log",
                                                                          "tools.log"))
    assert "gRPC PushModel called by token 'demo-trainer' (role trainer)" in logs
    assert "gRPC Deploy called by token 'demo-operator' (role operator)" in logs
    assert "gRPC Rollback called by token 'demo-operator' (role operator)" in logs
    for token in [out / "tokens" / "trainer.token", out / "tokens" / "operator.token", out / "credentials" /
                  "grpc-token"]:
        assert token.stat().st_mode & 0o077 == 0, token
        assert token.read_text().strip() not in logs
    assert "refused (UNAUTHENTICATED)" not in logs and "refused (PERMISSION_DENIED)" not in logs
    # a directory that is not a previous demo output is refused with exit 2 and one line, untouched
    other = tmp_path / "not-a-demo"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    r2 = subprocess.run([sys.executable, "-m", "demo", "--out", str(other)], cwd=str(REPO), env=env,
                        capture_output=True, text=True, timeout=60)
    assert r2.returncode == 2 and "not a previous demo output" in r2.stderr
    assert (other / "precious.txt").read_text() == "keep me"


def test_sigterm_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    """SIGTERM once the hub (and its Mosquitto) run: the demo stops them, as on Ctrl-C, and exits 143."""
    from demo.loop import pid_alive
    from tests.helpers.wait import wait_for

    out = tmp_path / "demo-out"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    demo = subprocess.Popen([sys.executable, "-m", "demo", "--out", str(out)], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info, broker = out / "hub-data" / "hub.json", out / "hub-data" / "broker" / "broker.json"
        wait_for(lambda: (info.exists() and broker.exists()) or demo.poll() is not None, 300, interval=0.2,
                 what="the demo's hub and its Mosquitto")
        assert demo.poll() is None, demo.communicate()
        pids = {"hub": json.loads(info.read_text())["pid"], "mosquitto": json.loads(broker.read_text())["pid"]}
        assert all(pid_alive(p) for p in pids.values())
        demo.send_signal(signal.SIGTERM)
        stdout, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "demo stopped by SIGTERM" in stderr
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []  # nothing left running
