"""The spool's record format: one payload and its key (the frame id), checksummed.

``KSP2 | payload length (u32 BE) | crc32 (u32 BE) | key length (u16 BE) | key | payload``: the crc covers
key and payload, so a torn or garbled record is detected (FrameError saying what is wrong). Records of
older daemons, ``KSP1 | length | crc32 | payload`` (no key), are still read (key None). :func:`peek_key`
reads a record's key from its header alone: the spool rebuilds its ``frame id -> sequence`` index on open
that way, without reading payloads.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Callable, Optional, Tuple

from edge.errors import FrameError

MAGIC = b"KSP2"
MAGIC_V1 = b"KSP1"  # older daemons' records: no key in the header
HEADER = struct.Struct(">4sIIH")  # magic, payload length, crc32 of key + payload, key length
HEADER_V1 = struct.Struct(">4sII")


KeyOf = Callable[[bytes], str]


def encode_record(payload: bytes, key: str = "") -> bytes:
    k = key.encode("utf-8")
    if len(k) > 0xFFFF:
        raise FrameError(f"record key of {len(k)} bytes is too long")
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload, zlib.crc32(k)) & 0xFFFFFFFF, len(k)) + k + payload


def decode_keyed(blob: bytes) -> Tuple[Optional[str], bytes]:
    """(key, payload) of a record (key None for an older daemon's record); FrameError saying what is
    wrong if it is torn or garbled."""
    magic = blob[:4]
    if magic == MAGIC_V1 and len(blob) >= HEADER_V1.size:
        _, length, crc = HEADER_V1.unpack_from(blob)
        key_bytes, payload = b"", blob[HEADER_V1.size:]
    else:
        if len(blob) < HEADER.size:
            raise FrameError(f"truncated header ({len(blob)} bytes)")
        magic, length, crc, key_len = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise FrameError("bad magic")
        key_bytes, payload = blob[HEADER.size:HEADER.size + key_len], blob[HEADER.size + key_len:]
        if len(key_bytes) != key_len:
            raise FrameError(f"truncated key ({len(key_bytes)} of {key_len} bytes)")
    if len(payload) != length:
        raise FrameError(f"length {len(payload)} != recorded {length} (torn write)")
    if zlib.crc32(payload, zlib.crc32(key_bytes)) & 0xFFFFFFFF != crc:
        raise FrameError("checksum mismatch")
    if magic == MAGIC_V1:
        return None, payload
    try:
        return key_bytes.decode("utf-8"), payload
    except UnicodeDecodeError as exc:
        raise FrameError("key is not UTF-8") from exc


def decode_record(blob: bytes) -> bytes:
    """Return the payload of a record; FrameError saying what is wrong if it is torn or garbled."""
    return decode_keyed(blob)[1]


def peek_key(path: Path) -> Optional[str]:
    """The key in a record file's header without reading its payload; None when it has none (an older
    record) or the header is unreadable (reading the whole record later says why)."""
    try:
        with open(str(path), "rb") as fh:
            head = fh.read(HEADER.size + 256)
            if len(head) < HEADER.size or head[:4] != MAGIC:
                return None
            key_len = HEADER.unpack_from(head)[3]
            if len(head) < HEADER.size + key_len:
                head += fh.read(HEADER.size + key_len - len(head))
            key = head[HEADER.size:HEADER.size + key_len]
            return key.decode("utf-8") if len(key) == key_len else None
    except (OSError, UnicodeDecodeError):
        return None
