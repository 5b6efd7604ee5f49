"""The boards ``make flash-image BOARD=...`` knows: their L4T release, Python, wheels and NVIDIA commands."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

from jetson.errors import ImageInputError


@dataclasses.dataclass(frozen=True)
class Board:
    name: str
    title: str
    l4t_major: int               # the L4T release the board's Linux_for_Tegra must be (R32, R36)
    l4t_minor_min: int           # ... at least this revision (R32.7 for JetPack 4.6)
    jetpack: str
    python: str                  # the device's interpreter: what first boot makes the venv from
    python_version: str          # pip --python-version
    glibc: Tuple[int, int]       # the rootfs's glibc: the newest manylinux tag a wheel may have
    constraints: str             # jetson/<file>: the versions pinned for the device
    extras: str                  # kestrel[<extras>] installed on the device
    pip_pin: str                 # the pip the device's venv is given (the rootfs's own may be too old)
    systemd: int                 # the rootfs's systemd: LoadCredential= needs 247
    flash: List[str]             # NVIDIA's flash command, run in Linux_for_Tegra
    sd_image: List[str]          # NVIDIA's SD card image command; {out} is the image path
    arch: str = "aarch64"        # the machine (tests resolve a local wheelhouse with x86_64)

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    @property
    def platforms(self) -> List[str]:
        """pip --platform tags a wheel for this board may carry: manylinux2014 and every
        manylinux_2_17 .. manylinux_2_<glibc minor> (pip does not widen a given --platform itself)."""
        major, minor = self.glibc
        return [f"manylinux2014_{self.arch}"] + [f"manylinux_{major}_{m}_{self.arch}" for m in range(17, minor + 1)]

    @property
    def load_credential(self) -> bool:
        return self.systemd >= 247


BOARDS: Dict[str, Board] = {b.name: b for b in [
    Board(name="jetson-nano", title="Jetson Nano developer kit (JetPack 4.6, L4T R32.7, SD card)",
          l4t_major=32, l4t_minor_min=7, jetpack="4.6", python="/usr/bin/python3.8", python_version="3.8",
          glibc=(2, 27), constraints="constraints-jp46.txt", extras="edge,tflite-runtime", pip_pin="pip==25.0.1",
          systemd=237, flash=["./flash.sh", "jetson-nano-devkit", "mmcblk0p1"],
          sd_image=["./tools/jetson-disk-image-creator.sh", "-o", "{out}", "-b", "jetson-nano", "-r", "300"]),
    Board(name="jetson-orin-nano", title="Jetson Orin Nano developer kit (JetPack 6, L4T R36, NVMe)",
          l4t_major=36, l4t_minor_min=0, jetpack="6", python="/usr/bin/python3.10", python_version="3.10",
          glibc=(2, 35), constraints="constraints-jp6.txt", extras="edge,litert", pip_pin="pip==25.0.1",
          systemd=249,
          flash=["./tools/kernel_flash/l4t_initrd_flash.sh", "--external-device", "nvme0n1p1",
                 "-c", "tools/kernel_flash/flash_l4t_t234_nvme.xml",
                 "-p", "-c bootloader/generic/cfg/flash_t234_qspi.xml",
                 "--showlogs", "--network", "usb0", "jetson-orin-nano-devkit", "internal"],
          sd_image=["./tools/jetson-disk-image-creator.sh", "-o", "{out}", "-b", "jetson-orin-nano-devkit",
                    "-d", "SD"]),
]}


def board(name: str) -> Board:
    if name not in BOARDS:
        known = ", ".join(f"{b.name} ({b.title})" for b in BOARDS.values())
        raise ImageInputError(f"unknown board {name!r}: BOARD= is one of {known}")
    return BOARDS[name]
