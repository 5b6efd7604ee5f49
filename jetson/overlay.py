"""Every file Kestrel puts on a Jetson's root file system, with its mode and owner, written into NVIDIA's
rootfs (``make flash-image``) or into a tarball (``make jetson-overlay``).

The files come from ``jetson/overlay/`` (units, first boot, the sysusers config, the edge.toml template)
and from the inputs: the device identity (its edge.toml snippet merged into the template, its
certificates and secrets under /etc/kestrel/credentials), the fleet's trusted keys, an initial signed
bundle, the offline wheelhouse. ``entries()`` is the one table of paths, modes and owners both writers
use. The ``kestrel`` system user comes from ``usr/lib/sysusers.d/kestrel.conf``: ``systemd-sysusers
--root`` creates it in the target root before anything is owned by it (and again at every boot).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from jetson.boards import Board
from jetson.errors import ImageInputError, ToolFailed
from jetson.identity import Identity, device_config

OVERLAY = Path(__file__).resolve().parent / "overlay"
USER = "kestrel"
SYSUSERS = "usr/lib/sysusers.d/kestrel.conf"


@dataclasses.dataclass
class Entry:
    path: str                      # relative to the root: "etc/kestrel/edge.toml"
    kind: str                      # "file", "dir" or "symlink"
    mode: int
    owner: str = "root"
    group: str = "root"
    data: Optional[bytes] = None   # file contents (or read from source)
    source: Optional[Path] = None  # a big file copied as is (wheels, bundles)
    target: str = ""               # symlink target


def _file(path: str, mode: int, data: bytes, group: str = "root", owner: str = "root") -> Entry:
    return Entry(path, "file", mode, owner, group, data=data)


def credentials_dropin(ident: Identity) -> bytes:
    """The unit drop-in passing the device's secrets with LoadCredential= (systemd >= 247)."""
    lines = ["# Made by `make flash-image` from the device identity: the daemon reads these secrets from",
             "# $CREDENTIALS_DIRECTORY (the files themselves are root-only).", "[Service]"]
    lines += [f"LoadCredential={m}:/etc/kestrel/credentials/{m}" for m in sorted(ident.members) if ident.secret(m)]
    return ("\n".join(lines) + "\n").encode()


def firstboot_env(board: Board, requirement: str, bundle: Optional[Path]) -> bytes:
    return (f"# What first boot installs (written by `make flash-image` for {board.name}).\n"
            f"KESTREL_PYTHON={board.python}\n"
            f"KESTREL_REQUIREMENT='{requirement}'\n"
            f"KESTREL_PIP='{board.pip_pin}'\n"
            f"KESTREL_INITIAL_BUNDLE={'/opt/kestrel/initial/' + bundle.name if bundle else ''}\n").encode()


def entries(board: Board, ident: Identity, trust: List[Path], bundle: Optional[Path], wheelhouse: Path,
            requirement: str) -> List[Entry]:
    """The whole overlay: every directory, file and link with its mode and owner."""
    if not trust:
        raise ImageInputError("no trusted public key: pass TRUST=keys/signing.pub (the fleet's model-signing "
                              "key; several separated by spaces)")
    for t in trust:
        if not t.is_file() or t.suffix != ".pub":
            raise ImageInputError(f"trusted key {t} is not a .pub file")
    if bundle is not None and (not bundle.is_file() or bundle.suffix != ".kbundle"):
        raise ImageInputError(f"initial bundle {bundle} is not a .kbundle file (BUNDLE=)")
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not any(w.name.startswith("kestrel-") for w in wheels):
        raise ImageInputError(f"wheelhouse {wheelhouse} holds no Kestrel wheel; build it with "
                              f"`python -m jetson wheelhouse --board {board.name} --out {wheelhouse}`")
    template = (OVERLAY / "etc/kestrel/edge.toml").read_text()
    out: List[Entry] = [
        Entry("etc/kestrel", "dir", 0o750, group=USER),
        _file("etc/kestrel/edge.toml", 0o640, device_config(template, ident, board.load_credential).encode(),
              group=USER),
        _file("etc/kestrel/identity.json", 0o644,
              (json.dumps(ident.info, indent=1, sort_keys=True) + "\n").encode()),
        Entry("etc/kestrel/trust", "dir", 0o755),
        Entry("etc/kestrel/credentials", "dir", 0o750, group=USER),
    ]
    out += [_file(f"etc/kestrel/trust/{t.name}", 0o644, t.read_bytes()) for t in trust]
    for member, data in sorted(ident.members.items()):
        if not ident.secret(member):
            out.append(_file(f"etc/kestrel/credentials/{member}", 0o644, data))
        elif board.load_credential:
            out.append(_file(f"etc/kestrel/credentials/{member}", 0o600, data))  # systemd hands it over
        else:
            out.append(_file(f"etc/kestrel/credentials/{member}", 0o640, data, group=USER))
    for rel in ("etc/systemd/system/kestrel-edge.service", "etc/systemd/system/kestrel-firstboot.service",
                SYSUSERS):
        out.append(_file(rel, 0o644, (OVERLAY / rel).read_bytes()))
    if board.load_credential and any(ident.secret(m) for m in ident.members):
        out += [Entry("etc/systemd/system/kestrel-edge.service.d", "dir", 0o755),
                _file("etc/systemd/system/kestrel-edge.service.d/credentials.conf", 0o644, credentials_dropin(ident))]
    out += [Entry("etc/systemd/system/multi-user.target.wants/kestrel-firstboot.service", "symlink", 0o777,
                  target="/etc/systemd/system/kestrel-firstboot.service"),
            Entry("usr/local/lib/kestrel", "dir", 0o755),
            _file("usr/local/lib/kestrel/firstboot.sh", 0o755,
                  (OVERLAY / "usr/local/lib/kestrel/firstboot.sh").read_bytes()),
            Entry("opt/kestrel", "dir", 0o755),
            _file("opt/kestrel/firstboot.env", 0o644, firstboot_env(board, requirement, bundle)),
            Entry("opt/kestrel/wheelhouse", "dir", 0o755)]
    out += [Entry(f"opt/kestrel/wheelhouse/{w.name}", "file", 0o644, source=w) for w in wheels]
    constraints = wheelhouse / "constraints.txt"
    if constraints.is_file():
        out.append(Entry("opt/kestrel/wheelhouse/constraints.txt", "file", 0o644, source=constraints))
    if bundle is not None:
        out += [Entry("opt/kestrel/initial", "dir", 0o755),
                Entry(f"opt/kestrel/initial/{bundle.name}", "file", 0o644, source=bundle)]
    out.append(Entry("var/lib/kestrel", "dir", 0o750, owner=USER, group=USER))
    return out


def _ids(root: Path) -> Tuple[Dict[str, int], Dict[str, int]]:
    def table(name: str) -> Dict[str, int]:
        rows = (root / "etc" / name).read_text().splitlines()
        return {r.split(":")[0]: int(r.split(":")[2]) for r in rows if r.count(":") >= 3}

    return table("passwd"), table("group")


def create_user(root: Path) -> Tuple[int, int]:
    """``systemd-sysusers --root`` with Kestrel's sysusers.d file: the kestrel user and group in ``root``
    (the rootfs's /etc/passwd, group, shadow, gshadow). Returns their ids."""
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        raise ImageInputError("systemd-sysusers not found: apt-get install systemd (it creates the kestrel user "
                              "in the image)")
    conf = root / SYSUSERS
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_bytes((OVERLAY / SYSUSERS).read_bytes())
    proc = subprocess.run([exe, f"--root={root}", str(conf)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolFailed(f"systemd-sysusers --root={root} failed: {proc.stderr.strip()[-300:]}")
    users, groups = _ids(root)
    if USER not in users or USER not in groups:
        raise ToolFailed(f"systemd-sysusers did not create the {USER} user in {root}/etc/passwd")
    return users[USER], groups[USER]


def write_tree(items: List[Entry], root: Path) -> None:
    """Write the overlay into a root file system (as root: owners are set from the root's own passwd)."""
    users, groups = _ids(root)
    for e in items:
        dest = root / e.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if e.kind == "dir":
            dest.mkdir(exist_ok=True)
        elif e.kind == "symlink":
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            os.symlink(e.target, dest)
            continue
        elif e.source is not None:
            shutil.copyfile(e.source, dest)
        else:
            assert e.data is not None
            dest.write_bytes(e.data)
        os.chown(dest, users[e.owner], groups[e.group])
        os.chmod(dest, e.mode)


def write_tar(items: List[Entry], out: Path) -> None:
    """The overlay as a tarball: every member with its mode, owner and group names and ids (the ids a
    fresh systemd-sysusers gives; GNU tar maps by name when the user exists)."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        (scratch / "etc").mkdir()
        (scratch / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (scratch / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
        create_user(scratch)
        users, groups = _ids(scratch)
    now = int(time.time())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as tar:
        for e in items:
            info = tarfile.TarInfo(e.path)
            info.mode, info.mtime = e.mode, now
            info.uname, info.gname, info.uid, info.gid = e.owner, e.group, users[e.owner], groups[e.group]
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
                tar.addfile(info)
            else:
                data = e.data if e.data is not None else e.source.read_bytes()  # type: ignore[union-attr]
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp_out, out)
