"""The Jetson image: the overlay (every file, its mode and owner), the units (systemd-analyze verify), the
device's edge.toml from the identity, and `make flash-image` against a stand-in Linux_for_Tegra whose
NVIDIA scripts record how they were called (NVIDIA's tools flash hardware; they cannot run here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from edge import config
from edge.telemetry.watchdog import PING_FRACTION
from jetson import overlay
from jetson.wheelhouse import local_wheels
from tests.helpers import jetson as jh
from tests.helpers.bundles import make_keypair, write_bundle

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "jetson"
UNITS = JETSON / "overlay/etc/systemd/system"


# --- inputs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:  # noqa: ANN001
    """Kestrel's wheel from this checkout and the sdist-only wheels, as the real builder makes them (the
    third-party wheels do not matter to the overlay; tests/test_jetson_wheelhouse.py resolves those)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    local_wheels(out)
    (out / "constraints.txt").write_text((JETSON / "constraints-jp46.txt").read_text())
    return out


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory) -> Path:  # noqa: ANN001
    """cam-7's identity bundle from the real `kestrel-hub devices add cam-7 --group lobby --password`."""
    return jh.enrolled_identity(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def inputs(tmp_path: Path, models_dir: Path, enrolled: Path) -> Dict[str, Path]:
    kp = make_keypair(tmp_path)
    identity = tmp_path / enrolled.name
    shutil.copy2(enrolled, identity)
    return {"identity": identity,
            "trust": kp.pub_path,
            "bundle": write_bundle(tmp_path / "brightness-v1.kbundle", models_dir / "brightness_int8.tflite", kp)}


def jetson_cli(*args: str, env: Dict[str, str] = None, cwd: Path = REPO) -> subprocess.CompletedProcess:  # type: ignore[assignment]  # noqa: E501
    e = dict(os.environ, PYTHONPATH=str(REPO), JETSON_PASSWORD=jh.PASSWORD)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "jetson", *args], cwd=str(cwd), env=e, capture_output=True,
                          text=True, timeout=300)


def one_error(proc: subprocess.CompletedProcess, what: str) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"jetson {what}: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


# --- the shipped files ----------------------------------------------------------------------------------
def test_scripts_parse_as_posix_sh() -> None:
    script = JETSON / "overlay/usr/local/lib/kestrel/firstboot.sh"
    for sh in ("sh", "bash"):
        r = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{sh}: {r.stderr}"


def test_template_is_a_valid_config_for_a_csi_camera_over_tls() -> None:
    cfg = config.load(JETSON / "overlay/etc/kestrel/edge.toml")
    assert cfg.source.kind == "gstreamer" and cfg.source.preset == "csi"
    assert cfg.mqtt.tls and cfg.mqtt.ca_file == "/etc/kestrel/credentials/ca.crt"
    assert cfg.update.trust_dir == "/etc/kestrel/trust" and cfg.data_dir == Path("/var/lib/kestrel")
    assert cfg.model.threads == 0 and cfg.telemetry.tegrastats == "auto"


def unit(name: str) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for ln in (UNITS / name).read_text().splitlines():
        if "=" in ln and not ln.startswith("#"):
            k, v = ln.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_edge_unit_checks_config_notifies_and_runs_as_kestrel() -> None:
    u = unit("kestrel-edge.service")
    assert "--check-config" in u["ExecStartPre"][0] and "--check-config" not in u["ExecStart"][0]
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"]
    assert u["User"] == ["kestrel"] and u["SupplementaryGroups"] == ["video"] and u["KillSignal"] == ["SIGTERM"]
    watchdog_s = float(u["WatchdogSec"][0])
    # consistent with the daemon: it pings every PING_FRACTION of this while frames flow, and a live source
    # reopens itself after stall_timeout_s; the watchdog must leave that reopen time to work first
    assert watchdog_s * PING_FRACTION > config.SourceConfig().stall_timeout_s
    assert watchdog_s > 2 * config.SourceConfig().stall_timeout_s
    assert u["PrivateTmp"] == ["no"] and u["PrivateDevices"] == ["no"]  # /tmp/argus_socket, /dev/video*, GPU
    assert u["ProtectSystem"] == ["strict"] and u["NoNewPrivileges"] == ["yes"]
    assert u["ConditionPathExists"] == ["/var/lib/kestrel/.firstboot-done"]
    fb = unit("kestrel-firstboot.service")
    assert fb["ConditionPathExists"] == ["!/var/lib/kestrel/.firstboot-done"] and fb["Type"] == ["oneshot"]


@pytest.fixture
def scratch_root() -> Iterator[Path]:
    """A root readable by other users (pytest's tmp dirs are 0700), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="kestrel-root-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def verify_units(root: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify --root: the units as the device's systemd reads them (with their drop-ins)."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (make test does this as root)")
    (root / "usr/lib/systemd").mkdir(parents=True, exist_ok=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True,
                    dirs_exist_ok=True)  # sysinit.target and friends, which verify resolves
    venv = root / "opt/kestrel/venv/bin/kestrel-edge"
    venv.parent.mkdir(parents=True, exist_ok=True)
    venv.write_text("#!/bin/sh\n")  # what first boot installs
    venv.chmod(0o755)
    return subprocess.run([exe, "verify", f"--root={root}", "/etc/systemd/system/kestrel-edge.service",
                           "/etc/systemd/system/kestrel-firstboot.service"], capture_output=True, text=True)


def write_overlay(root: Path, board: str, inputs: Dict[str, Path], wheelhouse: Path) -> List[overlay.Entry]:
    return jh.write_overlay(root, board, inputs["identity"], inputs["trust"], inputs["bundle"], wheelhouse)


@pytest.mark.parametrize("board", ["jetson-nano", "jetson-orin-nano"])
def test_units_pass_systemd_analyze_verify(scratch_root: Path, board: str, inputs, wheelhouse) -> None:  # noqa: ANN001
    write_overlay(scratch_root, board, inputs, wheelhouse)
    r = verify_units(scratch_root)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr  # verify warns on stderr and still exits 0
    dropin = scratch_root / "etc/systemd/system/kestrel-edge.service.d/credentials.conf"
    assert dropin.exists() == (board == "jetson-orin-nano")


def test_verify_would_catch_a_broken_unit(scratch_root: Path, inputs, wheelhouse) -> None:  # noqa: ANN001
    write_overlay(scratch_root, "jetson-nano", inputs, wheelhouse)
    u = scratch_root / "etc/systemd/system/kestrel-edge.service"
    u.write_text(u.read_text().replace("WatchdogSec=30", "WatchdogSec=thirty\nFooBar=1"))
    r = verify_units(scratch_root)
    assert "thirty" in r.stderr and "FooBar" in r.stderr


# --- the overlay, file by file ---------------------------------------------------------------------------
NANO_EXPECTED: Dict[str, Tuple[str, int, str, str]] = {  # path -> (kind, mode, owner, group)
    "etc/kestrel": ("d", 0o750, "root", "kestrel"),
    "etc/kestrel/edge.toml": ("f", 0o640, "root", "kestrel"),  # readable by the service (the old defect)
    "etc/kestrel/identity.json": ("f", 0o644, "root", "root"),
    "etc/kestrel/trust": ("d", 0o755, "root", "root"),
    "etc/kestrel/trust/signing.pub": ("f", 0o644, "root", "root"),
    "etc/kestrel/credentials": ("d", 0o750, "root", "kestrel"),
    "etc/kestrel/credentials/ca.crt": ("f", 0o644, "root", "root"),
    "etc/kestrel/credentials/device.crt": ("f", 0o644, "root", "root"),
    "etc/kestrel/credentials/device.key": ("f", 0o640, "root", "kestrel"),  # systemd 237: no LoadCredential
    "etc/kestrel/credentials/mqtt-password": ("f", 0o640, "root", "kestrel"),
    "etc/kestrel/credentials/grpc-token": ("f", 0o640, "root", "kestrel"),  # its hub token: fetch only
    "etc/kestrel/credentials/fleet.pub": ("f", 0o644, "root", "root"),  # the hub's desired-state key (public)
    "etc/systemd/system/kestrel-edge.service": ("f", 0o644, "root", "root"),
    "etc/systemd/system/kestrel-firstboot.service": ("f", 0o644, "root", "root"),
    "etc/systemd/system/multi-user.target.wants/kestrel-firstboot.service": ("l", 0o777, "root", "root"),
    "usr/lib/sysusers.d/kestrel.conf": ("f", 0o644, "root", "root"),
    "usr/local/lib/kestrel": ("d", 0o755, "root", "root"),
    "usr/local/lib/kestrel/firstboot.sh": ("f", 0o755, "root", "root"),
    "opt/kestrel": ("d", 0o755, "root", "root"),
    "opt/kestrel/firstboot.env": ("f", 0o644, "root", "root"),
    "opt/kestrel/wheelhouse": ("d", 0o755, "root", "root"),
    "opt/kestrel/wheelhouse/constraints.txt": ("f", 0o644, "root", "root"),
    "opt/kestrel/initial": ("d", 0o755, "root", "root"),
    "opt/kestrel/initial/brightness-v1.kbundle": ("f", 0o644, "root", "root"),
    "var/lib/kestrel": ("d", 0o750, "kestrel", "kestrel"),
}


def test_overlay_tarball_records_every_file_mode_and_owner(tmp_path: Path, inputs, wheelhouse) -> None:  # noqa: ANN001
    out = tmp_path / "overlay.tar"
    r = jetson_cli("overlay", "--board", "jetson-nano", "--identity", str(inputs["identity"]),
                   "--trust", str(inputs["trust"]), "--bundle", str(inputs["bundle"]), "--wheelhouse", str(wheelhouse),
                   "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        wheels = {n for n in members if n.startswith("opt/kestrel/wheelhouse/") and n.endswith(".whl")}
        assert {Path(w).name.split("-")[0] for w in wheels} == {"kestrel", "sdnotify"}
        for w in wheels:
            m = members[w]
            assert (m.isfile(), m.mode, m.uname, m.gname) == (True, 0o644, "root", "root"), w
        got = {}
        for name, m in members.items():
            if name in wheels:
                continue
            kind = "d" if m.isdir() else "l" if m.issym() else "f" if m.isfile() else "?"
            got[name] = (kind, m.mode, m.uname, m.gname)
        assert got == NANO_EXPECTED
        kestrel_ids = {(m.uid, m.gid) for m in members.values() if m.uname == "kestrel"}
        assert len(kestrel_ids) == 1 and 0 not in kestrel_ids.pop()  # a real system id, not root's
        assert members["etc/systemd/system/multi-user.target.wants/kestrel-firstboot.service"].linkname == \
            "/etc/systemd/system/kestrel-firstboot.service"
        toml = tar.extractfile("etc/kestrel/edge.toml").read().decode()  # type: ignore[union-attr]
        env = tar.extractfile("opt/kestrel/firstboot.env").read().decode()  # type: ignore[union-attr]
    cfg = config.from_dict(__import__("tomlkit").parse(toml).unwrap())
    assert (cfg.device.id, cfg.device.group) == ("cam-7", "lobby")
    assert cfg.mqtt.host == "hub.example.net" and cfg.mqtt.username == "cam-7"
    assert cfg.mqtt.key_file == "/etc/kestrel/credentials/device.key"  # read through the kestrel group
    # the secure default from the identity: TLS with its certificate, desired state signed by the fleet key
    assert cfg.mqtt.tls and cfg.mqtt.port == 8883 and cfg.mqtt.cert_file == "/etc/kestrel/credentials/device.crt"
    assert cfg.update.fleet_keys == ["/etc/kestrel/credentials/fleet.pub"] and cfg.update.require_signed_desired
    assert cfg.update.hub_grpc == "hub.example.net:50051"
    # models come over TLS verified with the fleet CA, with the device's own token (role device)
    assert cfg.update.tls and cfg.update.ca_file == "/etc/kestrel/credentials/ca.crt"
    assert cfg.update.token_file == "/etc/kestrel/credentials/grpc-token"
    assert cfg.source.preset == "csi" and "# csi: nvarguscamerasrc" in toml  # the template's comments stay
    assert "KESTREL_PYTHON=/usr/bin/python3.8" in env and "KESTREL_REQUIREMENT='kestrel[edge,tflite-runtime]" in env
    assert "sudo systemd-sysusers" in r.stdout


def test_orin_gets_its_secrets_through_load_credential(scratch_root: Path, inputs, wheelhouse) -> None:  # noqa: ANN001
    write_overlay(scratch_root, "jetson-orin-nano", inputs, wheelhouse)
    creds = scratch_root / "etc/kestrel/credentials"
    for secret in ("device.key", "mqtt-password", "grpc-token"):
        st = (creds / secret).stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 0, 0), secret  # root only: systemd reads it
    dropin = (scratch_root / "etc/systemd/system/kestrel-edge.service.d/credentials.conf").read_text()
    assert "LoadCredential=device.key:/etc/kestrel/credentials/device.key" in dropin
    assert "LoadCredential=mqtt-password:/etc/kestrel/credentials/mqtt-password" in dropin
    assert "LoadCredential=grpc-token:/etc/kestrel/credentials/grpc-token" in dropin
    cfg = config.load(scratch_root / "etc/kestrel/edge.toml")
    assert cfg.mqtt.key_file == "device.key" and cfg.mqtt.password_file == "mqtt-password"  # $CREDENTIALS_DIRECTORY
    assert cfg.update.token_file == "grpc-token"
    assert cfg.mqtt.cert_file == "/etc/kestrel/credentials/device.crt"  # public: read where it is
    assert cfg.update.fleet_keys == ["/etc/kestrel/credentials/fleet.pub"]  # public too
    assert "fleet.pub" not in dropin


def as_uid(uid: int, gid: int, *cmd: str) -> subprocess.CompletedProcess:
    """Run cmd as uid:gid with no other groups, as systemd runs User=kestrel (setpriv, util-linux)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd],
                          capture_output=True, text=True)


def test_the_service_user_reads_its_config_and_nobody_else_does(scratch_root: Path, inputs, wheelhouse) -> None:  # noqa: ANN001,E501
    """The known defect, tried as the service would: edge.toml 0640 root:kestrel, read as kestrel."""
    write_overlay(scratch_root, "jetson-nano", inputs, wheelhouse)
    users, groups = overlay._ids(scratch_root)
    uid, gid = users["kestrel"], groups["kestrel"]
    toml = str(scratch_root / "etc/kestrel/edge.toml")
    assert as_uid(uid, gid, "cat", toml).returncode == 0
    assert as_uid(uid, gid, "cat", str(scratch_root / "etc/kestrel/credentials/device.key")).returncode == 0
    assert as_uid(uid, gid, "touch", str(scratch_root / "var/lib/kestrel/writable")).returncode == 0
    assert as_uid(uid, gid, "touch", str(scratch_root / "etc/kestrel/edge.toml")).returncode != 0
    other = as_uid(65534, 65534, "cat", toml)  # nobody: not in the kestrel group
    assert other.returncode != 0 and "Permission denied" in other.stderr
    sysusers = (scratch_root / "etc/group").read_text()
    assert any(ln.startswith("video:") and "kestrel" in ln for ln in sysusers.splitlines())  # m kestrel video


# --- the flash wrapper ---------------------------------------------------------------------------------
def flash_args(l4t: Path, inputs: Dict[str, Path], wheelhouse: Path, board: str = "jetson-nano") -> List[str]:
    return ["flash", "--l4t", str(l4t), "--board", board, "--identity", str(inputs["identity"]),
            "--trust", str(inputs["trust"]), "--bundle", str(inputs["bundle"]), "--wheelhouse", str(wheelhouse)]


def test_flash_nano_prepares_the_rootfs_then_calls_nvidia(tmp_path: Path, inputs, wheelhouse) -> None:  # noqa: ANN001
    l4t, log = jh.stand_in_l4t(tmp_path)
    r = jetson_cli(*flash_args(l4t, inputs, wheelhouse), "--device", "cam-7")
    assert r.returncode == 0, r.stderr[-3000:]
    gid = overlay._ids(l4t / "rootfs")[1]["kestrel"]
    got = jh.calls(log)
    assert got == [
        f"apply_binaries.sh cwd={l4t}",
        f"tools/l4t_create_default_user.sh [-u] [jetson] [-p] [{jh.PASSWORD}] [-n] [cam-7] [--accept-license] "
        f"cwd={l4t} edge.toml=640:{gid}",
        f"flash.sh [jetson-nano-devkit] [mmcblk0p1] cwd={l4t} edge.toml=640:{gid}",  # the overlay was in place
    ]
    assert jh.PASSWORD not in r.stdout + r.stderr and "-p '****'" in r.stdout  # the password is not echoed
    rootfs = l4t / "rootfs"
    assert "kestrel:x:" in (rootfs / "etc/passwd").read_text()
    _users, groups = overlay._ids(rootfs)
    st = (rootfs / "etc/kestrel/edge.toml").stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 0, groups["kestrel"])
    st = (rootfs / "var/lib/kestrel").stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o750, groups["kestrel"])
    assert config.load(rootfs / "etc/kestrel/edge.toml").device.id == "cam-7"
    assert (rootfs / "opt/kestrel/initial/brightness-v1.kbundle").read_bytes() == inputs["bundle"].read_bytes()
    assert os.readlink(rootfs / "etc/systemd/system/multi-user.target.wants/kestrel-firstboot.service") == \
        "/etc/systemd/system/kestrel-firstboot.service"
    assert not (rootfs / "etc/systemd/system/kestrel-edge.service.d").exists()  # systemd 237


def test_flash_orin_makes_an_sd_card_image(tmp_path: Path, inputs, wheelhouse) -> None:  # noqa: ANN001
    l4t, log = jh.stand_in_l4t(tmp_path, release="# R36 (release), REVISION: 4.3, GCID: 0, BOARD: generic",
                               python="usr/bin/python3.10")
    (l4t / "rootfs/etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3\n")  # binaries applied
    image = tmp_path / "cam-7.img"
    r = jetson_cli(*flash_args(l4t, inputs, wheelhouse, "jetson-orin-nano"), "--sd-image", str(image),
                   "--user", "ops")
    assert r.returncode == 0, r.stderr[-3000:]
    got = jh.calls(log)
    assert len(got) == 2 and got[0].startswith("tools/l4t_create_default_user.sh [-u] [ops] ")
    gid = overlay._ids(l4t / "rootfs")[1]["kestrel"]
    assert got[1] == (f"tools/jetson-disk-image-creator.sh [-o] [{image}] [-b] [jetson-orin-nano-devkit] [-d] [SD] "
                      f"cwd={l4t} edge.toml=640:{gid}")
    assert "SD card image ready" in r.stdout
    assert (l4t / "rootfs/etc/systemd/system/kestrel-edge.service.d/credentials.conf").exists()
    env = (l4t / "rootfs/opt/kestrel/firstboot.env").read_text()
    assert "KESTREL_PYTHON=/usr/bin/python3.10" in env and "kestrel[edge,litert]" in env


def test_flash_adds_python38_to_a_stock_jetpack46_rootfs(tmp_path: Path, inputs, wheelhouse) -> None:  # noqa: ANN001
    """Ubuntu 18.04's sample rootfs has python3.6: python3.8 is installed with apt in the aarch64 rootfs
    (a chroot through qemu-user-static); here chroot and qemu are stand-ins that record the calls."""
    l4t, log = jh.stand_in_l4t(tmp_path, python=None)
    bin_dir = tmp_path / "bin"
    jh.fake_tool(bin_dir, "qemu-aarch64-static", log)
    rootfs = l4t / "rootfs"
    os.symlink("../run/systemd/resolve/stub-resolv.conf", rootfs / "etc/resolv.conf")  # as Ubuntu's rootfs has
    jh.fake_tool(bin_dir, "chroot", log, extra=f'[ "$6" = python3.8 ] && touch {rootfs}/usr/bin/python3.8; exit 0')
    r = jetson_cli(*flash_args(l4t, inputs, wheelhouse), env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = [c.split(" cwd=")[0] for c in jh.calls(log)]
    assert got[:3] == ["apply_binaries.sh", f"chroot [{rootfs}] [apt-get] [update]",
                       f"chroot [{rootfs}] [apt-get] [install] [-y] [--no-install-recommends] [python3.8]"]
    assert got[-1].startswith("flash.sh") and (rootfs / "usr/bin/python3.8").exists()
    # what apt needed is gone again: the device resolves names through its own systemd-resolved
    assert os.readlink(rootfs / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    assert not (rootfs / "usr/bin/qemu-aarch64-static").exists()


@pytest.mark.parametrize("case, message", [
    ("no-l4t", "L4T= is required"),
    ("not-a-folder", "is not a folder"),
    ("no-flash.sh", "is not NVIDIA's Linux_for_Tegra: flash.sh missing"),
    ("empty-rootfs", "rootfs/ holds no root file system"),
    ("wrong-release", "is L4T R35.4; BOARD=jetson-nano needs L4T R32.7 or later (JetPack 4.6)"),
    ("unknown-board", "unknown board 'jetson-tx2'"),
    ("no-board", "BOARD= is required"),
    ("no-identity", "missing device identity: pass IDENTITY=NAME.identity.tar"),
    ("identity-not-a-tar", "is not a tar file"),
    ("identity-without-key", "device.crt and device.key come together"),
    ("other-device", "DEVICE=cam-8 but the identity"),
    ("no-password", "JETSON_PASSWORD is not set"),
    ("no-trust", "no trusted public key"),
])
def test_flash_refuses_wrong_inputs_with_one_line(tmp_path: Path, inputs, wheelhouse, case: str,  # noqa: ANN001
                                                  message: str) -> None:
    l4t, log = jh.stand_in_l4t(tmp_path)
    args = flash_args(l4t, inputs, wheelhouse)
    env: Dict[str, str] = {}

    def set_arg(flag: str, value: str) -> None:
        args[args.index(flag) + 1] = value

    if case == "no-l4t":
        set_arg("--l4t", "")
    elif case == "not-a-folder":
        set_arg("--l4t", str(tmp_path / "nowhere"))
    elif case == "no-flash.sh":
        (l4t / "flash.sh").unlink()
    elif case == "empty-rootfs":
        (l4t / "rootfs/etc/os-release").unlink()
    elif case == "wrong-release":
        (l4t / "nv_tegra/bsp_version").write_text("# R35 (release), REVISION: 4.1\n")
    elif case == "unknown-board":
        set_arg("--board", "jetson-tx2")
    elif case == "no-board":
        set_arg("--board", "")
    elif case == "no-identity":
        set_arg("--identity", "")
    elif case == "identity-not-a-tar":
        (tmp_path / "junk.identity.tar").write_text("not a tar")
        set_arg("--identity", str(tmp_path / "junk.identity.tar"))
    elif case == "identity-without-key":
        members = jh.identity_members()
        del members["device.key"]
        set_arg("--identity", str(jh.write_identity(tmp_path / "nokey.identity.tar", members)))
    elif case == "other-device":
        args += ["--device", "cam-8"]
    elif case == "no-password":
        env["JETSON_PASSWORD"] = ""
    elif case == "no-trust":
        args[args.index("--trust") + 1: args.index("--trust") + 2] = []
    r = jetson_cli(*args, env=env)
    assert message in one_error(r, "flash")
    assert jh.calls(log) == [] and not (l4t / "rootfs/etc/kestrel").exists()  # nothing ran, nothing written


def test_flash_dry_run_prints_the_steps_and_changes_nothing(tmp_path: Path, inputs, wheelhouse) -> None:  # noqa: ANN001
    l4t, log = jh.stand_in_l4t(tmp_path)
    before = jh.tree(l4t)
    r = jetson_cli(*flash_args(l4t, inputs, wheelhouse), "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    for step in ("./apply_binaries.sh", "Kestrel overlay into", "l4t_create_default_user.sh", "./flash.sh"):
        assert step in r.stdout, step
    assert jh.calls(log) == [] and jh.tree(l4t) == before


def test_make_flash_image_runs_the_wrapper(tmp_path: Path, inputs, wheelhouse) -> None:  # noqa: ANN001
    """The Makefile target itself, with the Python given (no `setup` runs when it exists)."""
    l4t, log = jh.stand_in_l4t(tmp_path)
    r = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), f"VPY={sys.executable}", "flash-image",
                        f"L4T={l4t}", "BOARD=jetson-nano", f"IDENTITY={inputs['identity']}", "DEVICE=cam-7",
                        f"TRUST={inputs['trust']}", f"BUNDLE={inputs['bundle']}", f"WHEELHOUSE={wheelhouse}",
                        f"SDCARD={tmp_path / 'sd.img'}"],
                       env=dict(os.environ, PYTHONPATH=str(REPO), JETSON_PASSWORD=jh.PASSWORD), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "pip install" not in r.stdout  # no setup step
    assert jh.calls(log)[-1].startswith(f"tools/jetson-disk-image-creator.sh [-o] [{tmp_path / 'sd.img'}] "
                                        "[-b] [jetson-nano] [-r] [300]")
    bad = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), f"VPY={sys.executable}", "flash-image",
                          f"L4T={l4t}", "BOARD=jetson-nano"], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "missing device identity" in bad.stderr
