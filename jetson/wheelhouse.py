"""The offline wheelhouse a Jetson installs Kestrel from at first boot (no network on the device).

Resolved for the board, not for the host: ``pip download --only-binary=:all: --platform <every
manylinux tag the board's glibc accepts> --python-version <the board's Python> --implementation cp --abi
cpXY`` with the board's pinned versions (``jetson/constraints-*.txt``), plus Kestrel's own wheel (``pip
wheel --no-deps .``) and a pip new enough for manylinux_2_x tags (the device's venv is made
``--without-pip`` and gets this one). A pure-Python dependency published only as an sdist (sdnotify) is
built into a ``py3-none-any`` wheel on the host first; nothing platform-specific is ever built here.

Every project the constraints file pins is asked for by name too (pip reads environment markers with the
host's interpreter, so ``tomli; python_version < "3.11"`` would be missed for a Python 3.8 device).

``resolve()`` runs the same resolution as ``pip install --dry-run --target`` and reports what the board
would get, without downloading the wheels themselves (the tests and ``python -m jetson wheelhouse
--dry-run``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from jetson.boards import Board
from jetson.errors import ToolFailed

JETSON = Path(__file__).resolve().parent
REPO = JETSON.parent
SDIST_ONLY = ["sdnotify==0.3.2"]  # pure Python, published as an sdist only: built into a py3-none-any wheel


def _pip(args: List[str], what: str, python: Optional[str] = None) -> str:
    cmd = [python or sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        raise ToolFailed(f"{what} failed (pip exit {proc.returncode}): {' | '.join(tail[-3:]) or 'no message'}")
    return proc.stdout


def kestrel_version() -> str:
    import tomlkit

    return str(tomlkit.parse((REPO / "pyproject.toml").read_text())["project"]["version"])  # type: ignore[index]


def requirement(board: Board) -> str:
    return f"kestrel[{board.extras}]=={kestrel_version()}"


def local_wheels(out: Path, python: Optional[str] = None) -> List[Path]:
    """Kestrel's wheel from this checkout and the sdist-only pure-Python wheels, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("kestrel-*.whl"):
        old.unlink()  # the checkout's wheel is rebuilt every time
    _pip(["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)], "building Kestrel's wheel",
         python)
    for req in SDIST_ONLY:
        name = req.split("==")[0]
        if not list(out.glob(f"{name}-*-py3-none-any.whl")):
            _pip(["wheel", "--no-deps", "-q", "-w", str(out), req], f"building the {name} wheel", python)
    return sorted(out.glob("*.whl"))


def platform_args(board: Board) -> List[str]:
    args = ["--only-binary=:all:", "--python-version", board.python_version, "--implementation", "cp",
            "--abi", board.abi]
    for tag in board.platforms:
        args += ["--platform", tag]
    return args


def pinned(board: Board) -> List[str]:
    """The projects the board's constraints file pins (the device's whole dependency closure)."""
    lines = (JETSON / board.constraints).read_text().splitlines()
    return [ln.split("==")[0].strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def requirement_args(board: Board, find_links: Path) -> List[str]:
    """Kestrel with the board's extras, pip, and every pinned project by name: pip evaluates environment
    markers (``tomli; python_version < "3.11"``) with the interpreter it runs on, not with --python-version,
    so a dependency the device needs only because of its older Python would otherwise be left out."""
    return ["--find-links", str(find_links), "-c", str(JETSON / board.constraints), requirement(board),
            board.pip_pin, *pinned(board)]


def target_environment(board: Board) -> Dict[str, str]:
    """PEP 508 marker values of the device (what its own pip would evaluate markers with)."""
    return {"python_version": board.python_version, "python_full_version": board.python_version + ".0",
            "platform_machine": board.arch, "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": board.python_version + ".0", "platform_release": "", "platform_version": ""}


def missing_dependencies(board: Board, items: List[dict]) -> List[str]:
    """Requirements of the resolved wheels that hold on the device but were not resolved (pip judged their
    markers by the host's Python): what a fixed point over the resolution adds."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = target_environment(board)
    have = {canonicalize_name(i["metadata"]["name"]) for i in items}
    missing = []
    for item in items:
        extras = [""] + list(item.get("requested_extras") or [])
        for text in item["metadata"].get("requires_dist") or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate(dict(env, extra=e)) for e in extras):
                continue
            if canonicalize_name(req.name) not in have:
                req.marker = None
                missing.append(str(req))
    return sorted(set(missing))


def _report(board: Board, scratch: Path, links: Path, extra: List[str]) -> List[dict]:
    report = scratch / "report.json"
    _pip(["install", "-q", "--dry-run", "--ignore-installed", "--target", str(scratch / "target"),
          "--report", str(report), *platform_args(board), *requirement_args(board, links), *extra],
         f"resolving the wheels for {board.name} (Python {board.python_version}, {board.arch}, "
         f"glibc {board.glibc[0]}.{board.glibc[1]})")
    items: List[dict] = json.loads(report.read_text())["install"]
    return items


def closure(board: Board, scratch: Path, links: Path) -> Tuple[List[dict], List[str]]:
    """The resolution with every dependency the device needs (markers read as the device reads them):
    (report items, the requirements added to the pinned ones)."""
    added: List[str] = []
    for _round in range(6):
        items = _report(board, scratch, links, added)
        more = missing_dependencies(board, items)
        if not more:
            return items, added
        added += more
    raise ToolFailed(f"the dependencies for {board.name} do not settle: still missing {more}")


def build(board: Board, out: Path) -> List[Path]:
    """Download every wheel the board needs into ``out`` (ToolFailed, exit 3, when the registry is out of
    reach or a wheel does not exist for the board)."""
    import tempfile

    local_wheels(out)
    with tempfile.TemporaryDirectory() as tmp:
        _items, added = closure(board, Path(tmp), out)
    _pip(["download", "-q", "-d", str(out), *platform_args(board), *requirement_args(board, out), *added],
         f"downloading the wheels for {board.name}")
    (out / "constraints.txt").write_text((JETSON / board.constraints).read_text())
    return sorted(out.glob("*.whl"))


def resolve(board: Board, scratch: Path) -> Dict[str, Tuple[str, str]]:
    """What ``build`` would put in the wheelhouse, {project: (version, wheel file name)}, from a dry-run
    resolution (pip reads the wheels' metadata only)."""
    wheels = scratch / "local-wheels"
    local_wheels(wheels)
    items, _added = closure(board, scratch, wheels)
    out: Dict[str, Tuple[str, str]] = {}
    for item in items:
        name = item["metadata"]["name"].lower().replace("_", "-")
        out[name] = (item["metadata"]["version"], item["download_info"]["url"].rsplit("/", 1)[-1])
    return out
