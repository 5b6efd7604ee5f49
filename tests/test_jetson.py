"""The Jetson overlay: scripts parse, the shipped config is valid, the unit checks config first."""

from __future__ import annotations

import subprocess
from pathlib import Path

from edge import config

JETSON = Path(__file__).resolve().parents[1] / "jetson"


def test_shell_scripts_parse() -> None:
    for script in [JETSON / "build-image.sh", JETSON / "overlay/usr/local/lib/kestrel/firstboot.sh"]:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


def test_shipped_edge_config_is_valid() -> None:
    cfg = config.load(JETSON / "overlay/etc/kestrel/edge.toml")
    assert cfg.source.kind == "gstreamer" and "nvarguscamerasrc" in cfg.source.uri
    assert cfg.mqtt.tls and cfg.update.trust_dir == "/etc/kestrel/trust"


def test_unit_checks_config_before_start() -> None:
    unit = (JETSON / "overlay/etc/systemd/system/kestrel-edge.service").read_text()
    pre = [ln for ln in unit.splitlines() if ln.startswith("ExecStartPre=")]
    assert pre and "--check-config" in pre[0]
    assert "KillSignal=SIGTERM" in unit


def test_build_image_refuses_missing_inputs(tmp_path) -> None:
    r = subprocess.run(["bash", str(JETSON / "build-image.sh"), "--l4t", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "rootfs not found" in r.stderr


def test_build_image_dry_run_lists_steps(tmp_path) -> None:
    l4t = tmp_path / "Linux_for_Tegra"
    (l4t / "rootfs").mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    trust = tmp_path / "signing.pub"
    trust.write_text("pub")
    cfgf = tmp_path / "edge.toml"
    cfgf.write_text("")
    r = subprocess.run(["bash", str(JETSON / "build-image.sh"), "--l4t", str(l4t), "--wheelhouse", str(wheels),
                        "--trust", str(trust), "--config", str(cfgf), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "apply_binaries.sh" in r.stdout and "flash.sh" in r.stdout
    assert not (l4t / "rootfs" / "etc").exists()  # dry run wrote nothing
