"""Crash safety: SIGKILL the process at every step of an update, start again, and check it runs a
verified model (old or new, never a mix): the active slot's files match its signed manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from edge import config
from edge.updater import state as st
from tests.edge.test_updater import Device, bundle, make_cfg
from tests.helpers.bundles import make_keypair

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60

DRIVER = r'''
import hashlib, json, sys, time
import numpy as np
from edge import config
from edge.pipeline.loop import InferenceResult, ModelHolder
from edge.updater.service import UpdateService
from edge.updater import state as st

mode, cfg_path = sys.argv[1], sys.argv[2]
cfg = config.load(cfg_path)
holder = ModelHolder()
svc = UpdateService.from_config(cfg, None, holder, None)
model = svc.boot_model()
holder.swap(model)

def report():
    slot = svc.updater.slots.active()
    man = json.loads((slot.path / "manifest.json").read_text())
    for name, ent in man["files"].items():  # the slot's files against its signed manifest's hashes
        got = hashlib.sha256((slot.path / name).read_bytes()).hexdigest()
        assert got == ent["sha256"], f"{name} does not match the manifest"
    m = holder.get()
    assert m.ref.sha256 == man["files"][man["model_file"]]["sha256"], "running model is not the slot's"
    scores = m.infer(np.full((48, 64, 3), 230, np.uint8))
    print(json.dumps({"version": int(m.ref.version), "slot_version": man["version"],
                      "state": svc.updater.state.state, "top": float(np.max(scores)),
                      "trial": svc.updater.state.trial}), flush=True)

if mode == "boot":
    report()
elif mode in ("install", "hang"):
    svc.start()
    svc.install_bytes(open(sys.argv[3], "rb").read())
    if mode == "hang":
        report()
        sys.stdin.read()  # stays in the trial until killed
    i = 0
    while svc.updater.state.state == st.TRIAL:
        i += 1
        m = holder.get()
        t0 = time.perf_counter()
        s = m.infer(np.full((48, 64, 3), 230, np.uint8))
        svc.observe(InferenceResult(i, m.ref, s, time.perf_counter() - t0, None, False, []))
    svc.stop()
    report()
'''


@pytest.fixture
def rig(tmp_path, models_dir):  # noqa: ANN001
    kp = make_keypair(tmp_path)
    cfg = make_cfg(tmp_path, kp.pub_path, trial_frames=3, max_boot_attempts=1)
    cfgp = tmp_path / "edge.toml"
    cfgp.write_text(f'[device]\nid = "dev1"\ndata_dir = "{tmp_path / "data"}"\n[model]\nthreads = 1\n'
                    f'[update]\ntrust_dir = "{kp.pub_path}"\ntrial_frames = 3\ntrial_seconds = 0.0\n')
    dev = Device(cfg)
    dev.install(bundle(models_dir, kp, 1))
    assert dev.settle() == st.COMMITTED
    dev.close()
    v2 = tmp_path / "v2.kbundle"
    v2.write_bytes(bundle(models_dir, kp, 2))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return {"cfg": cfgp, "v2": v2, "driver": driver, "tmp": tmp_path, "kp": kp, "cfg_obj": cfg}


def _env(crash: str = "") -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(st.CRASH_ENV, None)
    if crash:
        env[st.CRASH_ENV] = crash
    return env


def _run(args: List[str], crash: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable] + args, cwd=str(ROOT), env=_env(crash), capture_output=True,
                          text=True, timeout=TIMEOUT)


def _boot(rig: Dict[str, Any]) -> Dict[str, Any]:
    r = _run([str(rig["driver"]), "boot", str(rig["cfg"])])
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# crash point -> the version the device must run after the restart (CLI install, daemon not running)
CLI_POINTS = {"VERIFIED": 1, "STAGE_PARTIAL": 1, "STAGED": 1, "SELF_TEST": 1, "TRIAL": 1, "SWITCHED": 2}


@pytest.mark.parametrize("point", list(CLI_POINTS))
def test_sigkill_during_cli_install(rig, point):  # noqa: ANN001
    r = _run(["-m", "edge.cli.update", "install", str(rig["v2"]), "--config", str(rig["cfg"])], crash=point)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    after = _boot(rig)
    assert after["version"] == after["slot_version"] == CLI_POINTS[point]
    assert after["top"] > 0.9
    if CLI_POINTS[point] == 1:
        assert after["state"] == st.FAILED  # the interrupted update is settled, not half-applied
    else:
        assert after["state"] == st.TRIAL and after["trial"]["boot_count"] == 1
    # and the update can simply be run again
    r = _run(["-m", "edge.cli.update", "install", str(rig["v2"]), "--config", str(rig["cfg"])])
    assert r.returncode == 0 or "on trial" in r.stderr, r.stderr


# crash point inside the running daemon's hot-swap path -> version after restart
# (SWITCHED: the daemon died during the trial of v2 -> the next start rolls back to v1)
DAEMON_POINTS = {"SELF_TEST": 1, "TRIAL": 1, "SWITCHED": 1, "COMMITTED": 2}


@pytest.mark.parametrize("point", list(DAEMON_POINTS))
def test_sigkill_during_daemon_update(rig, point):  # noqa: ANN001
    r = _run([str(rig["driver"]), "install", str(rig["cfg"]), str(rig["v2"])], crash=point)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    after = _boot(rig)
    assert after["version"] == after["slot_version"] == DAEMON_POINTS[point]
    assert after["top"] > 0.9


def test_daemon_dying_in_trial_comes_back_on_previous_model(rig):  # noqa: ANN001
    # default max_boot_attempts = 1: the hot swap is start 1; the first crash in the trial rolls back
    p = subprocess.Popen([sys.executable, str(rig["driver"]), "hang", str(rig["cfg"]), str(rig["v2"])],
                         cwd=str(ROOT), env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    p.kill()
    p.wait(TIMEOUT)
    p.stdout.close()
    p.stdin.close()
    during = json.loads(line)
    assert (during["version"], during["state"], during["trial"]["boot_count"]) == (2, st.TRIAL, 1)
    after = _boot(rig)  # the start after the crash rolls back before loading the trial model
    assert (after["version"], after["state"]) == (1, st.ROLLED_BACK)
    from edge.updater.engine import Updater

    upd = Updater.from_config(config.load(rig["cfg"]))
    assert upd.state.floor("brightness") == 2 and upd.outcome(upd.slots.inactive()) == st.OUT_REJECTED


@pytest.mark.parametrize("point", ["ROLLING_BACK", "ROLLBACK_SWITCHED"])
def test_sigkill_during_rollback_finishes_it_at_boot(rig, models_dir, point):  # noqa: ANN001
    dev = Device(rig["cfg_obj"])
    dev.baseline()
    assert dev.install(rig["v2"].read_bytes()) and dev.settle() == st.COMMITTED
    dev.close()
    r = _run(["-m", "edge.cli.update", "rollback", "--config", str(rig["cfg"])], crash=point)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    after = _boot(rig)
    assert (after["version"], after["slot_version"], after["state"]) == (1, 1, st.ROLLED_BACK)
    from edge.updater.engine import Updater

    upd = Updater.from_config(config.load(rig["cfg"]))
    assert upd.state.floor("brightness") == 2  # the rollback's intent was carried out in full
    assert upd.outcome(upd.slots.inactive()) == st.OUT_REJECTED


def test_crash_between_switch_and_floor_keeps_the_crashed_version_out(rig):  # noqa: ANN001
    # the daemon dies right after the pointer flip, before the floor was raised; the next start rolls
    # back, and the version that crashed must still count as run: an operator's install is refused
    r = _run([str(rig["driver"]), "install", str(rig["cfg"]), str(rig["v2"])], crash="SWITCHED")
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    after = _boot(rig)
    assert (after["version"], after["state"]) == (1, st.ROLLED_BACK)
    from edge.updater.engine import Updater
    from proto.errors import BundleError

    upd = Updater.from_config(config.load(rig["cfg"]))
    assert upd.state.floor("brightness") == 2
    with upd.locked(), pytest.raises(BundleError) as ei:
        upd.prepare(rig["v2"].read_bytes(), manual=True)
    assert ei.value.reason == "downgrade"
    assert upd.slots.active().version == 1
