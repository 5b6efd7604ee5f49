"""The durable outgoing-frame spool: an on-disk FIFO that survives restarts and power cuts.

Layout of the spool directory::

    00000000000000000042.rec   one file per record, named by its zero-padded sequence number
    seq                        the persisted sequence counter ("next sequence", decimal text)
    evictions                  how many records the budget evicted, ever (decimal text)
    dead_lettered              how many records were set aside in dead/, ever (decimal text)
    dead/NNN.rec               records set aside because the broker kept refusing them

A record file is ``MAGIC (4 bytes) | length (u32 BE) | crc32 (u32 BE) | payload``. It is written to a
temporary file, fsynced, renamed into place with ``os.replace`` and the directory is fsynced, so after
a power cut a record is either complete or absent. Should a record still be torn or garbled (a file
system without those guarantees, a bad sector), reading it detects the bad length/checksum, logs one
WARNING line, deletes it and moves on: it never crashes the daemon nor blocks the queue.

Sequence numbers never go backwards across restarts: on open the next sequence is
``max(counter file, highest record + 1)``, and a record is only deleted (acknowledged or evicted)
after the counter file already covers it.

Eviction rule (documented in docs/edge-transport.md): when appending would exceed ``max_bytes`` or
``max_frames``, the OLDEST records are evicted first, because the newest frames reflect the current
model and scene. Every eviction is counted (``evictions``, persisted: it survives restarts).

Dead letters: a record the broker keeps refusing (see edge.uplink.publisher) is moved, not deleted, to
``dead/`` by :meth:`Spool.set_aside`, so it no longer blocks the records behind it; at most
``max_dead`` are kept (the oldest go first, counted as evictions). When ``dead/`` cannot be written
the record stays in the spool (one ERROR line). The eviction count is written without fsync.

Filesystem errors: opening a spool directory that cannot be created or read raises ConfigError
(check ``[device] data_dir``); a write that fails (disk full, read-only) raises StorageError, after
one retry that first evicts the oldest record when the disk is full.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import re
import struct
import threading
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from edge.errors import FrameError, StorageError
from proto import atomic
from proto.errors import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"KSP1"
HEADER = struct.Struct(">4sII")
SUFFIX = ".rec"
WIDTH = 20
COUNTER_FILE = "seq"
EVICTIONS_FILE = "evictions"
DEAD_LETTERED_FILE = "dead_lettered"
DEAD_DIR = "dead"
MAX_DEAD = 100
_NAME = re.compile(r"^(\d{" + str(WIDTH) + r"})\.rec$")


def encode_record(payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload) & 0xFFFFFFFF) + payload


def decode_record(blob: bytes) -> bytes:
    """Return the payload of a record; FrameError saying what is wrong if it is torn or garbled."""
    if len(blob) < HEADER.size:
        raise FrameError(f"truncated header ({len(blob)} bytes)")
    magic, length, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise FrameError("bad magic")
    payload = blob[HEADER.size:]
    if len(payload) != length:
        raise FrameError(f"length {len(payload)} != recorded {length} (torn write)")
    if zlib.crc32(payload) & 0xFFFFFFFF != crc:
        raise FrameError("checksum mismatch")
    return payload


class Spool:
    """Thread-safe durable FIFO of byte records keyed by a monotonic sequence number."""

    def __init__(self, directory: Path, max_bytes: int, max_frames: int, fsync: bool = True,
                 max_dead: int = MAX_DEAD) -> None:
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        self.max_frames = int(max_frames)
        self.max_dead = int(max_dead)
        self.fsync = fsync
        self.corrupt = 0
        self._set_aside_failed = False
        self._lock = threading.RLock()
        self._index: Dict[int, int] = {}  # seq -> size on disk
        self._seqs: List[int] = []  # sorted, oldest first
        self._bytes = 0
        try:
            found = self._scan()
        except OSError as exc:
            raise ConfigError(f"cannot use the spool directory {self.dir}: {exc.strerror or exc}; "
                              "check [device] data_dir (it must be a writable directory)") from exc
        for seq, size in sorted(found):
            self._index[seq] = size
            self._seqs.append(seq)
            self._bytes += size
        self.evictions = self._read_int(EVICTIONS_FILE)
        # a counter (Prometheus *_total): not the number of files in dead/, which an operator may move
        self.dead_lettered = self._read_int(DEAD_LETTERED_FILE) or len(self.dead_letters())
        self._persisted_next = self._read_counter()
        highest = self._seqs[-1] + 1 if self._seqs else 0
        self._next = max(self._persisted_next, highest)
        if self._seqs:
            log.info("spool: %d frames (%d bytes) waiting in %s", len(self._index), self._bytes, self.dir)

    def _scan(self) -> List[Tuple[int, int]]:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not os.access(str(self.dir), os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied (not writable)")
        for tmp in self.dir.iterdir():  # leftovers of a write interrupted before os.replace
            if atomic.is_temp(tmp.name):
                log.warning("spool: removing unfinished write %s", tmp.name)
                tmp.unlink()
        found: List[Tuple[int, int]] = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p.stat().st_size))
        return found

    # -- persisted counters -----------------------------------------------------------------------

    def _read_int(self, name: str) -> int:
        p = self.dir / name
        try:
            return int(p.read_text().strip() or "0")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("spool: unreadable counter %s (%s); starting it from 0", p, exc)
            return 0

    def _read_counter(self) -> int:
        return self._read_int(COUNTER_FILE)

    def _write_counter(self, value: int) -> None:
        try:
            atomic.write_text(self.dir / COUNTER_FILE, str(value), fsync=self.fsync)
        except OSError as exc:
            raise StorageError(f"spool: cannot write the sequence counter in {self.dir}: "
                               f"{exc.strerror or exc}") from exc
        self._persisted_next = value

    def _count_evictions(self, n: int) -> None:
        self.evictions += n
        self._persist_count(EVICTIONS_FILE, self.evictions)

    def _persist_count(self, name: str, value: int) -> None:
        try:  # atomic, never fsynced: a statistic (a power cut may lose the last few counts)
            atomic.write_text(self.dir / name, str(value), fsync=False)
        except OSError as exc:  # the count is a statistic: never fail a frame because of it
            log.debug("spool: cannot persist the %s count: %s", name, exc)

    def _cover(self, seq: int) -> None:
        """Make sure the counter file is beyond ``seq`` before its record disappears."""
        if seq >= self._persisted_next:
            self._write_counter(self._next)

    @property
    def next_sequence(self) -> int:
        with self._lock:
            return self._next

    # -- records ----------------------------------------------------------------------------------

    def _path(self, seq: int) -> Path:
        return self.dir / (str(seq).zfill(WIDTH) + SUFFIX)

    def append(self, make: Callable[[int], bytes]) -> int:
        """Assign the next sequence, build the payload with ``make(seq)`` and store it durably.

        If ``make`` raises, the sequence is not consumed. Evicts the oldest records when the budget
        is full. A payload larger than the whole byte budget raises FrameError; a write the file
        system refuses raises StorageError (after evicting the oldest record and retrying once
        when the disk is full).
        """
        with self._lock:
            seq = self._next
            blob = encode_record(make(seq))
            if len(blob) > self.max_bytes:
                raise FrameError(f"record of {len(blob)} bytes is larger than the spool budget "
                                 f"({self.max_bytes} bytes): raise [spool] max_bytes")
            while self._index and (self._bytes + len(blob) > self.max_bytes
                                   or len(self._index) + 1 > self.max_frames):
                self._evict_oldest("budget full")
            try:
                atomic.write_bytes(self._path(seq), blob, fsync=self.fsync)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or not self._index:
                    raise StorageError(f"spool: cannot write a frame to {self.dir}: "
                                       f"{exc.strerror or exc}") from exc
                self._evict_oldest("disk full")
                try:
                    atomic.write_bytes(self._path(seq), blob, fsync=self.fsync)
                except OSError as exc2:
                    raise StorageError(f"spool: cannot write a frame to {self.dir}: "
                                       f"{exc2.strerror or exc2}") from exc2
            self._index[seq] = len(blob)
            self._seqs.append(seq)
            self._bytes += len(blob)
            self._next = seq + 1
            return seq

    def _evict_oldest(self, why: str) -> None:
        old = self._seqs[0]
        self._delete(old)
        self._count_evictions(1)
        log.warning("spool: %s (%d frames, %d bytes): evicted oldest frame seq=%d (%d evictions so far)",
                    why, len(self._index), self._bytes, old, self.evictions)

    def _forget(self, seq: int) -> bool:
        """Drop ``seq`` from the index (after the counter covers it); False if unknown."""
        size = self._index.pop(seq, None)
        if size is None:
            return False
        del self._seqs[bisect.bisect_left(self._seqs, seq)]
        self._bytes -= size
        self._cover(seq)
        return True

    def _delete(self, seq: int) -> None:
        if not self._forget(seq):
            return
        try:
            self._path(seq).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a read-only remount: the record comes back after a restart (a duplicate)
            log.warning("spool: cannot delete %s: %s", self._path(seq).name, exc.strerror or exc)

    @property
    def dead_dir(self) -> Path:
        return self.dir / DEAD_DIR

    def set_aside(self, seq: int) -> Optional[Path]:
        """Move record ``seq`` to ``dead/`` (kept, no longer sent); its path there, None if unknown."""
        with self._lock:
            src = self._path(seq)
            if seq not in self._index:
                return None
            dead = self.dead_dir
            try:
                dead.mkdir(exist_ok=True)
                os.replace(str(src), str(dead / src.name))
                atomic.fsync_dir(dead)
                atomic.fsync_dir(self.dir)
            except OSError as exc:  # kept where it is (and sent again), never deleted uncounted
                if not self._set_aside_failed:
                    log.error("spool: cannot move %s to %s (%s): it stays in the spool (later failures are "
                              "not logged)", src.name, dead, exc.strerror or exc)
                self._set_aside_failed = True
                return None
            self._forget(seq)
            self.dead_lettered += 1
            self._persist_count(DEAD_LETTERED_FILE, self.dead_lettered)
            kept = self.dead_letters()
            for old in kept[: max(0, len(kept) - self.max_dead)]:
                try:
                    old.unlink()
                    self._count_evictions(1)
                except OSError:
                    pass
            return dead / src.name

    def dead_letters(self) -> List[Path]:
        """Records set aside, oldest first."""
        try:
            return sorted(p for p in self.dead_dir.iterdir() if _NAME.match(p.name))
        except OSError:
            return []

    def remove(self, seq: int) -> None:
        """Delete a record (after the broker acknowledged it). Unknown sequences are ignored."""
        with self._lock:
            self._delete(seq)

    def read(self, seq: int) -> Optional[bytes]:
        """The payload of ``seq``; None (after logging and deleting it) if it is gone or corrupt."""
        with self._lock:
            if seq not in self._index:
                return None
            path = self._path(seq)
            try:
                blob = path.read_bytes()
                return decode_record(blob)
            except (OSError, FrameError) as exc:
                self.corrupt += 1
                log.warning("spool: skipping damaged record %s: %s", path.name, exc)
                self._delete(seq)
                return None

    def after(self, seq: Optional[int], limit: int) -> List[Tuple[int, bytes]]:
        """Up to ``limit`` readable records with a sequence greater than ``seq`` (None = from the start),
        in order. Damaged records are skipped (logged and deleted)."""
        out: List[Tuple[int, bytes]] = []
        with self._lock:
            start = 0 if seq is None else bisect.bisect_right(self._seqs, seq)
            while len(out) < limit and start < len(self._seqs):
                s = self._seqs[start]
                payload = self.read(s)  # a damaged record is deleted from _seqs: same index is next
                if payload is not None:
                    out.append((s, payload))
                    start += 1
        return out

    def sequences(self) -> List[int]:
        with self._lock:
            return list(self._seqs)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> Tuple[int, int, int]:
        """(bytes, frames, evictions since this spool was opened)."""
        with self._lock:
            return self._bytes, len(self._index), self.evictions
