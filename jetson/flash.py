"""``make flash-image``: Kestrel's overlay into NVIDIA's sample rootfs, then NVIDIA's own tools.

In ``L4T`` (NVIDIA's Linux_for_Tegra with the sample root file system extracted into ``rootfs/``):
``apply_binaries.sh`` when the rootfs has not had NVIDIA's binaries yet; the board's Python when the
sample rootfs lacks it (JetPack 4.6's Ubuntu 18.04 has python3.6: ``python3.8`` is added with apt in a
chroot, through qemu-user-static on an x86 host); the ``kestrel`` user (systemd-sysusers --root) and
every overlay file with its mode and owner; the default login user and the hostname (NVIDIA's
``tools/l4t_create_default_user.sh``, so no setup wizard waits on the device); then ``flash.sh`` /
``l4t_initrd_flash.sh`` for a Jetson in recovery mode on USB, or ``jetson-disk-image-creator.sh`` for an
SD card image. ``--dry-run`` checks every input and prints the steps without changing anything.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from jetson.boards import Board
from jetson.errors import ImageInputError, ToolFailed

NEEDED = ("flash.sh", "apply_binaries.sh", "tools/l4t_create_default_user.sh")
_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?")


def l4t_release(l4t: Path) -> Optional[Tuple[int, int]]:
    """(major, revision) from nv_tegra/bsp_version or rootfs/etc/nv_tegra_release ("# R32 (release), REVISION:
    7.1, ..."), None when neither says."""
    for rel in ("nv_tegra/bsp_version", "rootfs/etc/nv_tegra_release"):
        f = l4t / rel
        if f.is_file():
            m = _RELEASE.search(f.read_text(errors="replace"))
            if m:
                return int(m.group(1)), int(m.group(2))
    return None


def check_l4t(l4t: Optional[str], board: Board) -> Path:
    """The L4T folder, checked: NVIDIA's scripts, an extracted sample rootfs, the board's release."""
    if not l4t:
        raise ImageInputError("L4T= is required: the path of NVIDIA's Linux_for_Tegra (the extracted Jetson Linux "
                              f"BSP for JetPack {board.jetpack})")
    path = Path(l4t).resolve()
    if not path.is_dir():
        raise ImageInputError(f"L4T={l4t} is not a folder: point it at NVIDIA's Linux_for_Tegra")
    needed = dict.fromkeys(NEEDED + (_strip(board.flash[0]), _strip(board.sd_image[0])))
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ImageInputError(f"L4T={l4t} is not NVIDIA's Linux_for_Tegra: {', '.join(missing)} missing "
                              f"(extract Jetson_Linux_R{board.l4t_major}*_aarch64.tbz2 and point L4T= at its "
                              "Linux_for_Tegra)")
    if not (path / "rootfs/etc/os-release").is_file():
        raise ImageInputError(f"L4T={l4t}: rootfs/ holds no root file system; extract NVIDIA's sample rootfs into "
                              f"it: sudo tar xpf Tegra_Linux_Sample-Root-Filesystem_R{board.l4t_major}*.tbz2 "
                              f"-C {path}/rootfs")
    release = l4t_release(path)
    if release is None:
        raise ImageInputError(f"L4T={l4t}: no L4T release found (nv_tegra/bsp_version); is this NVIDIA's "
                              "Linux_for_Tegra?")
    if release[0] != board.l4t_major or release[1] < board.l4t_minor_min:
        raise ImageInputError(f"L4T={l4t} is L4T R{release[0]}.{release[1]}; BOARD={board.name} needs L4T "
                              f"R{board.l4t_major}.{board.l4t_minor_min} or later (JetPack {board.jetpack})")
    return path


def _strip(tool: str) -> str:
    return tool[2:] if tool.startswith("./") else tool


class Runner:
    """Runs (or with dry_run prints) the outside commands; every step is echoed as ``+ cmd``."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run

    def __call__(self, cmd: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, hide: str = "") -> None:
        shown = " ".join(shlex.quote("****" if hide and c == hide else c) for c in cmd)
        print(f"+ (cd {cwd} && {shown})", flush=True)
        if self.dry_run:
            return
        try:
            code = subprocess.run(cmd, cwd=str(cwd), env=env).returncode
        except OSError as exc:
            raise ToolFailed(f"cannot run {cmd[0]}: {exc.strerror or exc}") from exc
        if code != 0:
            raise ToolFailed(f"{cmd[0]} failed (exit code {code}); its output above says why")


def add_python(rootfs: Path, board: Board, run: Runner) -> None:
    """Install the board's Python into the rootfs with apt in a chroot (JetPack 4.6's lacks python3.8).
    The host's resolv.conf and qemu-aarch64-static are there only for the apt run: the rootfs's own
    resolv.conf (a link to systemd-resolved's stub) is put back and the emulator removed afterwards."""
    package = Path(board.python).name  # python3.8
    qemu_dest = rootfs / "usr/bin/qemu-aarch64-static"
    copy_qemu = None
    if platform.machine() not in ("aarch64", "arm64"):
        copy_qemu = shutil.which("qemu-aarch64-static")
        if copy_qemu is None:
            raise ImageInputError(f"the sample rootfs has no {board.python}; to add it the wrapper runs apt in the "
                                  "aarch64 rootfs, which needs qemu-user-static on this host: "
                                  "sudo apt-get install qemu-user-static")
    print(f"+ {package} into {rootfs} with apt in a chroot (the host's resolv.conf and qemu for the run only)",
          flush=True)
    if run.dry_run:
        return
    resolv = rootfs / "etc/resolv.conf"
    link = os.readlink(resolv) if resolv.is_symlink() else None
    saved = resolv.read_bytes() if link is None and resolv.exists() else None
    had_qemu = qemu_dest.exists()
    try:
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        if copy_qemu is not None and not had_qemu:
            shutil.copy2(copy_qemu, qemu_dest)
        run(["chroot", str(rootfs), "apt-get", "update"], rootfs)
        run(["chroot", str(rootfs), "apt-get", "install", "-y", "--no-install-recommends", package], rootfs,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    finally:
        resolv.unlink()
        if link is not None:
            os.symlink(link, resolv)
        elif saved is not None:
            resolv.write_bytes(saved)
        if copy_qemu is not None and not had_qemu and qemu_dest.exists():
            qemu_dest.unlink()
    if not (rootfs / board.python.lstrip("/")).exists():
        raise ToolFailed(f"apt in the rootfs did not install {board.python}")


def prepare_and_flash(l4t: Path, board: Board, write_overlay: Callable[[Path], None], hostname: str, user: str,
                      password: str, sd_image: Optional[Path], dry_run: bool) -> None:
    run = Runner(dry_run)
    rootfs = l4t / "rootfs"
    if not (rootfs / "etc/nv_tegra_release").is_file():
        run(["./apply_binaries.sh"], l4t)  # NVIDIA's drivers into the sample rootfs, once
    if not (rootfs / board.python.lstrip("/")).exists():
        add_python(rootfs, board, run)
    print(f"+ Kestrel overlay into {rootfs} (kestrel user, /etc/kestrel, units, wheelhouse)", flush=True)
    if not dry_run:
        write_overlay(rootfs)
    run(["./tools/l4t_create_default_user.sh", "-u", user, "-p", password, "-n", hostname, "--accept-license"],
        l4t, hide=password)
    if sd_image is not None:
        run([c.replace("{out}", str(sd_image)) for c in board.sd_image], l4t)
        print(f"SD card image ready: {sd_image} (write it with: sudo dd if={sd_image} of=/dev/sdX bs=4M "
              "conv=fsync status=progress)")
    else:
        run(list(board.flash), l4t)
        print(f"flashed: the Jetson boots as {hostname} and installs Kestrel on its first boot "
              "(journalctl -u kestrel-firstboot)")

