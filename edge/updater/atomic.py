"""Crash-safe file writes: temp file in the same directory, fsync, os.replace, directory fsync."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, Path]


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


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old or the new file, never a mix."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)


def write_json(path: PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def fsync_tree(root: PathLike) -> None:
    """fsync every file and directory under ``root`` (after staging a slot)."""
    for dirpath, _dirs, files in os.walk(str(root)):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)
