"""Crash-safe file writes, shared by every state file in Kestrel (spool records, slot pointer and
state, staged bundle files, registry blobs, hub.json): a temp file in the same directory, fsync,
``os.replace``, directory fsync. Readers see the old or the new file, never a mix, even after a
power cut. The temp file is created with O_NOFOLLOW, so a planted symlink is never written through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, Path]
TMP_MARK = ".tmp"  # temp names are ".{name}.tmp{pid}": hidden, and never match a real file's pattern


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so a rename or create inside it survives a power cut."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_temp(name: str) -> bool:
    """True for a leftover of a write interrupted before ``os.replace``."""
    return name.startswith(".") and TMP_MARK in name


def write_bytes(path: PathLike, data: bytes, *, fsync: bool = True, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically. ``fsync=False`` keeps atomicity but not durability."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(p)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(str(tmp), flags, mode)
    except FileExistsError:  # a leftover of a crashed process that had our pid: remove it (never follow)
        os.unlink(str(tmp))
        fd = os.open(str(tmp), flags, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(str(tmp), str(p))  # replaces a symlink at ``path`` itself, never writes through it
    except BaseException:
        try:
            os.unlink(str(tmp))
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(p.parent)


def write_text(path: PathLike, text: str, **kw: Any) -> None:
    write_bytes(path, text.encode("utf-8"), **kw)


def write_json(path: PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def fsync_tree(root: PathLike) -> None:
    """fsync every file and directory under ``root`` (after staging a slot)."""
    for dirpath, _dirs, files in os.walk(str(root)):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)
