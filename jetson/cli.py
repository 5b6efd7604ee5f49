"""``python -m jetson overlay | flash | wheelhouse`` (what ``make jetson-overlay`` and ``make flash-image`` run).

Errors are one line: exit 2 for a wrong input (L4T folder, board, identity, key, bundle), exit 3 when an
outside tool fails (pip cannot reach the registry, NVIDIA's flash finds no Jetson in recovery mode).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import List, Optional

from jetson import boards, overlay, wheelhouse
from jetson.errors import ImageInputError
from jetson.flash import check_l4t, prepare_and_flash
from jetson.identity import read_identity
from proto.errors import DEBUG_HELP, run_command

BUILD = Path("build/jetson")


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--board", default="", help=f"one of {', '.join(boards.BOARDS)}")
    p.add_argument("--identity", default="", help="NAME.identity.tar from `kestrel-hub devices add NAME`")
    p.add_argument("--trust", nargs="*", default=[], help="the fleet's trusted model-signing keys (*.pub)")
    p.add_argument("--bundle", default="", help="an initial signed model bundle (.kbundle), installed at first boot")
    p.add_argument("--wheelhouse", default="", help="a wheelhouse built before (default: built now into "
                                                    "build/jetson/BOARD/wheelhouse, needs the package registry)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jetson", description="Kestrel's Jetson image tools")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    ov = sub.add_parser("overlay", help="the rootfs overlay alone, as a tarball (make jetson-overlay)")
    _inputs(ov)
    ov.add_argument("--out", default="", help="the tarball (default: build/jetson/kestrel-overlay-DEVICE.tar)")
    fl = sub.add_parser("flash", help="overlay into NVIDIA's rootfs, then flash or make an SD image (make flash-image)")
    _inputs(fl)
    fl.add_argument("--l4t", default="", help="NVIDIA's Linux_for_Tegra folder")
    fl.add_argument("--device", default="", help="the device's name; must be the identity's (default: it)")
    fl.add_argument("--user", default="jetson", help="the login user NVIDIA's script creates (default: jetson)")
    fl.add_argument("--sd-image", default="", help="make this SD card image instead of flashing over USB")
    fl.add_argument("--dry-run", action="store_true", help="check the inputs, print the steps, change nothing")
    wh = sub.add_parser("wheelhouse", help="the offline wheels for a board")
    wh.add_argument("--board", default="", help=f"one of {', '.join(boards.BOARDS)}")
    wh.add_argument("--out", default="", help="the folder (default: build/jetson/BOARD/wheelhouse)")
    wh.add_argument("--dry-run", action="store_true", help="resolve only and list what the board would get")
    for sp in (ov, fl, wh):
        sp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def _board(name: str) -> boards.Board:
    if not name:
        raise ImageInputError(f"BOARD= is required: one of {', '.join(boards.BOARDS)}")
    return boards.board(name)


def _wheelhouse(args: argparse.Namespace, board: boards.Board) -> Path:
    if args.wheelhouse:
        path = Path(args.wheelhouse)
        if not path.is_dir():
            raise ImageInputError(f"WHEELHOUSE={path} is not a folder")
        return path
    out = BUILD / board.name / "wheelhouse"
    print(f"building the offline wheelhouse for {board.name} into {out} ...", flush=True)
    wheelhouse.build(board, out)
    return out


def _entries(args: argparse.Namespace, board: boards.Board) -> List[overlay.Entry]:
    ident = read_identity(args.identity)
    if getattr(args, "device", "") and args.device != ident.device_id:
        raise ImageInputError(f"DEVICE={args.device} but the identity {args.identity} is for {ident.device_id}: "
                              "pass that device's identity (or leave DEVICE= out)")
    trust = [Path(t) for t in args.trust]
    bundle = Path(args.bundle) if args.bundle else None
    return overlay.entries(board, ident, trust, bundle, _wheelhouse(args, board), wheelhouse.requirement(board))


def run_overlay(args: argparse.Namespace) -> int:
    board = _board(args.board)
    items = _entries(args, board)
    device = read_identity(args.identity).device_id
    out = Path(args.out) if args.out else BUILD / f"kestrel-overlay-{device}.tar"
    overlay.write_tar(items, out)
    print(f"{out}: {len(items)} entries for {device} on {board.name}; install it with: "
          f"sudo tar -xpf {out.name} -C / {overlay.SYSUSERS} && sudo systemd-sysusers && sudo tar -xpf {out.name} -C /")
    return 0


def run_flash(args: argparse.Namespace) -> int:
    board = _board(args.board)
    l4t = check_l4t(args.l4t, board)
    ident = read_identity(args.identity)
    password = os.environ.get("JETSON_PASSWORD", "")
    if not password:
        raise ImageInputError(f"JETSON_PASSWORD is not set: the login password of the device's user "
                              f"{args.user!r} (NVIDIA's l4t_create_default_user.sh sets it)")
    if not args.dry_run and os.geteuid() != 0:
        raise ImageInputError("run as root (sudo make flash-image ...): NVIDIA's tools and the rootfs need it")
    items = _entries(args, board)
    sd = Path(args.sd_image).resolve() if args.sd_image else None

    def write(rootfs: Path) -> None:
        overlay.create_user(rootfs)
        overlay.write_tree(items, rootfs)

    prepare_and_flash(l4t, board, write, ident.device_id, args.user, password, sd, args.dry_run)
    return 0


def run_wheelhouse(args: argparse.Namespace) -> int:
    board = _board(args.board)
    if args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            got = wheelhouse.resolve(board, Path(tmp))
        for name, (version, wheel) in sorted(got.items()):
            print(f"{name}=={version}  {wheel}")
        return 0
    out = Path(args.out) if args.out else BUILD / board.name / "wheelhouse"
    wheels = wheelhouse.build(board, out)
    print(f"{out}: {len(wheels)} wheels for {board.name} (Python {board.python_version}, aarch64)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    body = {"overlay": run_overlay, "flash": run_flash, "wheelhouse": run_wheelhouse}[args.command]
    return run_command(f"jetson {args.command}", lambda: body(args), debug=args.debug)
