"""Append-only segment files for the SQLite store's images (docs/adr/0009-sqlite-images-in-segment-files.md).

A batch's images are appended to this process's current segment file in one write and made durable
with one fdatasync *before* the rows pointing at them are committed; a row keeps (segment, offset,
length, sha256). So a row never points at bytes that were not on disk first, and a crash between
the two leaves only orphan bytes that no row names (harmless: they are never read). Every store
process (every SqliteStore) appends to segment files of its own, named with its pid and a random
token, so several processes sharing one database never write the same file. A segment is closed at
SEGMENT_MAX_BYTES (or after a failed write: the next append starts a new one, so a partial write is
never followed by bytes a row points at). Reads check length and hash and raise a one-line
StoreError when the bytes are missing or damaged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import threading
from pathlib import Path
from typing import List, Optional, Sequence

from hub.errors import StoreError, StoreUnavailable
from proto.clock import now_ms

SEGMENT_MAX_BYTES = 256 * 1024 * 1024  # a segment file is closed (a new one started) from this size on
WRITEV_MAX = 512                        # buffers per writev call (below every platform's IOV_MAX)
SUFFIX = ".seg"


@dataclasses.dataclass(frozen=True)
class ImageRef:
    segment: str   # file name inside the segment directory
    offset: int
    length: int
    sha256: str    # hex


def _fsync_dir(path: Path) -> None:
    """Like proto.atomic.fsync_dir, but an error is raised, not ignored: a row must never name a segment
    file whose name is not durable yet."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Segments:
    """The segment directory of one store: ``append`` for this process's writes, ``read`` for any segment."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._name = ""
        self._size = 0
        self.appends = 0  # fdatasyncs of segment data (one per append call)

    def _open_new(self) -> None:
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.dir.parent)
        name = f"{now_ms()}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        fd = os.open(str(self.dir / name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o644)
        try:
            _fsync_dir(self.dir)  # the file's name is durable before any row names it
        except OSError:
            os.close(fd)
            raise
        self._fd, self._name, self._size = fd, name, 0

    def _close_current(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:  # pragma: no cover
                pass
        self._fd, self._name, self._size = None, "", 0

    def _write_all(self, fd: int, images: Sequence[bytes]) -> None:
        for start in range(0, len(images), WRITEV_MAX):
            bufs: List[memoryview] = [memoryview(b) for b in images[start:start + WRITEV_MAX] if b]
            while bufs:
                n = os.writev(fd, bufs)
                while bufs and n >= len(bufs[0]):  # drop what was written, keep the rest of a partial one
                    n -= len(bufs[0])
                    bufs.pop(0)
                if bufs and n:
                    bufs[0] = bufs[0][n:]

    def append(self, images: Sequence[bytes], hashes: Optional[Sequence[str]] = None) -> List[ImageRef]:
        """Append the images (one write, one fdatasync); their refs, in order. ``hashes``: their sha256
        where the caller has it already (the ingest hashes on its validate pool), else computed here.
        StoreUnavailable on an OS error (disk full, I/O error): nothing of this call is referenced."""
        given = list(hashes) if hashes is not None else [""] * len(images)
        hashes = [h or hashlib.sha256(b).hexdigest() for b, h in zip(images, given)]
        with self._lock:
            try:
                if self._fd is None or self._size >= SEGMENT_MAX_BYTES:
                    self._close_current()
                    self._open_new()
                assert self._fd is not None
                self._write_all(self._fd, images)
                os.fdatasync(self._fd)
            except OSError as exc:
                self._close_current()  # what this call wrote may be partial: never append after it
                raise StoreUnavailable(f"cannot write images to {self.dir}: {exc.strerror or exc}") from exc
            refs = []
            offset = self._size
            for b, h in zip(images, hashes):
                refs.append(ImageRef(self._name, offset, len(b), h))
                offset += len(b)
            self._size = offset
            self.appends += 1
            return refs

    def read(self, frame_id: str, ref: ImageRef) -> bytes:
        """The image bytes, checked against the row's length and sha256; StoreError otherwise."""
        if not ref.segment or "/" in ref.segment or ref.segment.startswith("."):
            raise StoreError(f"frame {frame_id!r}: bad image segment name {ref.segment!r}")
        path = self.dir / ref.segment
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), ref.length, ref.offset)
        except FileNotFoundError:
            raise StoreError(f"frame {frame_id!r}: image segment {path} is missing") from None
        except OSError as exc:
            raise StoreError(f"frame {frame_id!r}: cannot read image segment {path}: {exc.strerror}") from exc
        if len(data) != ref.length:
            raise StoreError(f"frame {frame_id!r}: image segment {path} holds {len(data)} of the {ref.length} "
                             f"bytes at offset {ref.offset} (truncated)")
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise StoreError(f"frame {frame_id!r}: the image at offset {ref.offset} of {path} does not match "
                             "its sha256 (damaged)")
        return data

    def close(self) -> None:
        with self._lock:
            self._close_current()
