"""The offline wheelhouse resolves for the devices, not for this machine: aarch64 cp38 manylinux (glibc
<= 2.27) for JetPack 4.6's python3.8, aarch64 cp310 (glibc <= 2.35) for JetPack 6's system Python.

A dry-run resolution with the same pip arguments the builder downloads with (`--platform` for every
manylinux tag the board's glibc accepts, `--python-version`, `--implementation cp`, `--abi`,
`--only-binary=:all:`) against the package registry (reachable from tests and CI; the device never needs
it: first boot installs with --no-index, tests/test_jetson_firstboot.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest
from packaging.utils import parse_wheel_filename

from jetson import boards, wheelhouse

JETSON = Path(__file__).resolve().parents[1] / "jetson"


def pins(board: boards.Board) -> Dict[str, str]:
    out = {}
    for ln in (JETSON / board.constraints).read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, version = ln.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def compatible(board: boards.Board, wheel: str) -> bool:
    """The wheel installs on the board: pure Python, or the board's CPython ABI on aarch64 manylinux no newer
    than the board's glibc."""
    _name, _ver, _build, tags = parse_wheel_filename(wheel)
    for t in tags:
        if t.platform == "any" and t.interpreter.startswith("py3"):
            return True
        if t.abi not in (board.abi, "abi3", "none") or not t.platform.endswith("_aarch64"):
            continue
        if t.abi == "abi3" and int(t.interpreter[3:]) > int(board.abi[2:]):
            continue  # abi3 wheels need at least their interpreter's version
        if t.platform == "manylinux2014_aarch64":
            return True
        parts = t.platform.split("_")  # manylinux_2_27_aarch64
        if parts[0] == "manylinux" and (int(parts[1]), int(parts[2])) <= board.glibc:
            return True
    return False


@pytest.mark.parametrize("name, runtime, numpy", [("jetson-nano", "tflite-runtime", "1.24.4"),
                                                   ("jetson-orin-nano", "ai-edge-litert", "2.2.")])
def test_wheelhouse_resolves_for_the_device(tmp_path: Path, name: str, runtime: str, numpy: str) -> None:
    board = boards.board(name)
    got: Dict[str, Tuple[str, str]] = wheelhouse.resolve(board, tmp_path)
    assert got["kestrel"][0] == wheelhouse.kestrel_version()
    assert runtime in got and got["numpy"][0].startswith(numpy)
    for needed in ("sdnotify", "prometheus-client", "paho-mqtt", "grpcio", "cryptography", "opencv-python-headless",
                   "protobuf", "pip"):
        assert needed in got, needed
    assert got["pip"][0] == board.pip_pin.split("==")[1]
    for project, version in pins(board).items():  # the pins hold (== 1.2.* pins match their prefix)
        if project in got:
            assert got[project][0] == version or (version.endswith("*") and got[project][0].startswith(version[:-1])), \
                (project, got[project], version)
    wrong = {p: w for p, (_v, w) in got.items() if not compatible(board, w)}
    assert wrong == {}, f"wheels that would not install on {board.title}: {wrong}"
    assert any("aarch64" in w for _v, w in got.values())  # platform wheels really are for the Jetson


def test_the_check_of_compatibility_refuses_what_a_device_cannot_install() -> None:
    nano = boards.board("jetson-nano")
    assert compatible(nano, "numpy-1.24.4-cp38-cp38-manylinux_2_17_aarch64.manylinux2014_aarch64.whl")
    assert compatible(nano, "cryptography-46.0.7-cp38-abi3-manylinux_2_17_aarch64.whl")
    assert not compatible(nano, "cryptography-46.0.7-cp38-abi3-manylinux_2_28_aarch64.whl")  # glibc 2.28 > 2.27
    assert not compatible(nano, "numpy-1.24.4-cp38-cp38-manylinux_2_17_x86_64.whl")
    assert not compatible(nano, "numpy-2.2.6-cp310-cp310-manylinux_2_17_aarch64.whl")
    assert nano.platforms[0] == "manylinux2014_aarch64" and nano.platforms[-1] == "manylinux_2_27_aarch64"
