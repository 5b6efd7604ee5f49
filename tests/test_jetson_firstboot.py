"""First boot (jetson/overlay/usr/local/lib/kestrel/firstboot.sh) run in a scratch root used as a prefix,
with a real Python 3.8 as the device's system python, a wheelhouse the real builder made for this machine
(the device's is the same resolution for aarch64), NO network (its own network namespace, PIP_NO_INDEX),
and a systemctl that records its calls:

1. a boot whose wheelhouse lacks Kestrel fails with ONE clear line, no marker, nothing enabled;
2. the next boot (wheel back) makes the venv, installs the initial model through `kestrel-edge install`,
   enables and starts the daemon, leaves the marker;
3. a third boot changes nothing at all.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from jetson import boards, wheelhouse
from tests.edge.test_updater import bundle as updater_bundle
from tests.helpers import jetson as jh
from tests.helpers.bundles import make_keypair

REPO = Path(__file__).resolve().parents[1]
FIRSTBOOT = REPO / "jetson/overlay/usr/local/lib/kestrel/firstboot.sh"


def python38() -> str:
    """The real Python 3.8 (not a shim): $KESTREL_PY38, pyenv's versions/3.8.*, or python3.8 on PATH."""
    found = [os.environ.get("KESTREL_PY38", "")] + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8.*/bin/"
                                                                                       "python3.8")))
    found.append(shutil.which("python3.8") or "")
    for cand in filter(None, found):
        r = subprocess.run([cand, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True)
        if r.returncode == 0:
            return os.path.realpath(r.stdout.strip())
    if os.environ.get("KESTREL_REQUIRE_PY38") == "1":
        pytest.fail("no Python 3.8 here (pyenv install 3.8): first boot cannot be tried as on a Jetson Nano")
    pytest.skip("no Python 3.8 here: first boot is tried with JetPack 4.6's python3.8 only")


@pytest.fixture(scope="module")
def local_board() -> boards.Board:
    """The Nano's board, resolved for this machine (x86_64, its glibc) instead of aarch64."""
    glibc = tuple(int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
    return dataclasses.replace(boards.board("jetson-nano"), name="local", arch=os.uname().machine,
                               glibc=glibc)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cp38_wheelhouse(tmp_path_factory, local_board: boards.Board) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("wheelhouse-cp38")
    wheelhouse.build(local_board, out)  # the builder's real download, for this machine's platform
    return out


@pytest.fixture
def root() -> Iterator[Path]:
    r = Path(tempfile.mkdtemp(prefix="kestrel-fb-", dir="/tmp"))
    r.chmod(0o755)
    yield r
    shutil.rmtree(r, ignore_errors=True)


def boot(root: Path, systemctl: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "LANG": "C.UTF-8", "KESTREL_ROOT": str(root),
           "KESTREL_SYSTEMCTL": str(systemctl), "KESTREL_USER": pwd.getpwuid(os.getuid()).pw_name,
           "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": "/dev/null"}
    cmd = ["sh", str(FIRSTBOOT)]
    if os.geteuid() == 0 and shutil.which("unshare"):
        cmd = ["unshare", "--net", *cmd]  # no network at all, as on a device with no link yet
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_first_boot_fails_clearly_then_installs_then_does_nothing(root: Path, tmp_path: Path, models_dir: Path,
                                                                   cp38_wheelhouse: Path,
                                                                   local_board: boards.Board) -> None:
    py38 = python38()
    kp = make_keypair(tmp_path)
    bundle = tmp_path / "brightness-v1.kbundle"  # with self-test cases, as the trainer packages it
    bundle.write_bytes(updater_bundle(models_dir, kp, version=1))
    identity = jh.write_identity(tmp_path / "cam-7.identity.tar", jh.identity_members())
    jh.write_overlay(root, local_board, identity, kp.pub_path, bundle, cp38_wheelhouse,
                     wheelhouse.requirement(local_board))
    # a prefix, not a chroot: the device's absolute paths point into the scratch root, and its
    # /usr/bin/python3.8 is the real Python 3.8 of this machine
    conf = root / "etc/kestrel/edge.toml"
    text = conf.read_text()
    for path in ("/var/lib/kestrel", "/etc/kestrel/"):
        text = text.replace(f'"{path}', f'"{root}{path}')
    conf.write_text(text)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    os.symlink(py38, root / "usr/bin/python3.8")
    log = tmp_path / "systemctl.log"
    systemctl = jh.fake_tool(tmp_path / "bin", "systemctl", log)

    kestrel_wheel = next((root / "opt/kestrel/wheelhouse").glob("kestrel-*.whl"))
    aside = tmp_path / kestrel_wheel.name
    shutil.move(str(kestrel_wheel), str(aside))
    failed = boot(root, systemctl)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stderr.splitlines() == [
        f"kestrel-firstboot: FAILED to install {wheelhouse.requirement(local_board)} from the wheelhouse; nothing is "
        f"started, the next boot tries again (details: {root}/var/log/kestrel-firstboot.log)"]
    assert "No matching distribution found for kestrel" in (root / "var/log/kestrel-firstboot.log").read_text()
    assert not (root / "var/lib/kestrel/.firstboot-done").exists() and jh.calls(log) == []

    shutil.move(str(aside), str(kestrel_wheel))
    done = boot(root, systemctl)
    assert done.returncode == 0, done.stderr + (root / "var/log/kestrel-firstboot.log").read_text()[-3000:]
    assert done.stderr == "" and "kestrel-firstboot: done" in done.stdout
    assert [c.split(" cwd=")[0] for c in jh.calls(log)] == [
        "systemctl [enable] [kestrel-edge.service]", "systemctl [start] [--no-block] [kestrel-edge.service]"]
    venv = root / "opt/kestrel/venv"
    probe = subprocess.run([str(venv / "bin/python"), "-c", "import sys, tflite_runtime, sdnotify, "
                            "prometheus_client, pip; print(sys.version_info[:2], pip.__version__)"],
                           capture_output=True, text=True)
    assert probe.stdout.split() == ["(3,", "8)", local_board.pip_pin.split("==")[1]], probe.stderr
    status = subprocess.run([str(venv / "bin/kestrel-edge"), "status", "--json", "--config", str(conf)],
                            capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert status.returncode == 0, status.stderr
    installed = json.loads(status.stdout)["installed"]
    assert (installed["model_name"], installed["version"]) == ("brightness", 1)  # the verified install path
    assert (root / "var/lib/kestrel/.firstboot-done").exists()

    before = jh.tree(root)
    again = boot(root, systemctl)
    assert again.returncode == 0 and "already done" in again.stdout and again.stderr == ""
    assert jh.tree(root) == before and len(jh.calls(log)) == 2  # nothing changed, nothing started again


def test_first_boot_is_posix_sh_and_needs_no_network_tool() -> None:
    text = FIRSTBOOT.read_text()
    assert text.startswith("#!/bin/sh\n") and "--no-index" in text and "PIP_NO_INDEX=1" in text
    for tool in ("curl", "wget", "apt-get", "git "):
        assert tool not in text, tool
    assert subprocess.run(["sh", "-n", str(FIRSTBOOT)]).returncode == 0
    assert sys.version_info >= (3, 8)
