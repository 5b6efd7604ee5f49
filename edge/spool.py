"""The durable outgoing-frame spool: an on-disk FIFO that survives restarts and power cuts.

Layout of the spool directory::

    00000000000000000042.rec   one file per record, named by its zero-padded sequence number
    seq                        the persisted sequence counter ("next sequence", decimal text)

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
model and scene. Every eviction is counted (``evictions``).
"""

from __future__ import annotations

import bisect
import logging
import re
import struct
import threading
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from edge import atomic
from edge.errors import FrameError

log = logging.getLogger(__name__)

MAGIC = b"KSP1"
HEADER = struct.Struct(">4sII")
SUFFIX = ".rec"
WIDTH = 20
COUNTER_FILE = "seq"
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

    def __init__(self, directory: Path, max_bytes: int, max_frames: int, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.max_frames = int(max_frames)
        self.fsync = fsync
        self.evictions = 0
        self.corrupt = 0
        self._lock = threading.RLock()
        self._index: Dict[int, int] = {}  # seq -> size on disk
        self._seqs: List[int] = []  # sorted, oldest first
        self._bytes = 0
        for tmp in self.dir.iterdir():  # leftovers of a write interrupted before os.replace
            if atomic.is_temp(tmp.name):
                log.warning("spool: removing unfinished write %s", tmp.name)
                tmp.unlink()
        found: List[Tuple[int, int]] = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p.stat().st_size))
        for seq, size in sorted(found):
            self._index[seq] = size
            self._seqs.append(seq)
            self._bytes += size
        self._persisted_next = self._read_counter()
        highest = self._seqs[-1] + 1 if self._seqs else 0
        self._next = max(self._persisted_next, highest)
        if self._seqs:
            log.info("spool: %d frames (%d bytes) waiting in %s", len(self._index), self._bytes, self.dir)

    # -- sequence counter -------------------------------------------------------------------------

    def _read_counter(self) -> int:
        p = self.dir / COUNTER_FILE
        try:
            return int(p.read_text().strip() or "0")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("spool: unreadable sequence counter %s (%s); continuing from the records", p, exc)
            return 0

    def _write_counter(self, value: int) -> None:
        atomic.write_text(self.dir / COUNTER_FILE, str(value), fsync=self.fsync)
        self._persisted_next = value

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
        is full. A payload larger than the whole byte budget raises FrameError.
        """
        with self._lock:
            seq = self._next
            blob = encode_record(make(seq))
            if len(blob) > self.max_bytes:
                raise FrameError(f"record of {len(blob)} bytes is larger than the spool budget "
                                 f"({self.max_bytes} bytes): raise [spool] max_bytes")
            while self._index and (self._bytes + len(blob) > self.max_bytes
                                   or len(self._index) + 1 > self.max_frames):
                old = self._seqs[0]
                self._delete(old)
                self.evictions += 1
                log.warning("spool: budget full (%d frames, %d bytes): evicted oldest frame seq=%d "
                            "(%d evictions so far)", len(self._index), self._bytes, old, self.evictions)
            atomic.write_bytes(self._path(seq), blob, fsync=self.fsync)
            self._index[seq] = len(blob)
            self._seqs.append(seq)
            self._bytes += len(blob)
            self._next = seq + 1
            return seq

    def _delete(self, seq: int) -> None:
        size = self._index.pop(seq, None)
        if size is None:
            return
        del self._seqs[bisect.bisect_left(self._seqs, seq)]
        self._bytes -= size
        self._cover(seq)
        try:
            self._path(seq).unlink()
        except FileNotFoundError:
            pass

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
