"""Is a frame's image a well-formed JPEG or PNG? Two ways to ask (``[mqtt] image_check``).

``structure`` (the default) walks a JPEG's markers without decoding pixels: SOI; every segment's
length inside the data; a frame header (SOF) with 8/12-bit precision, non-zero size, 1-4 components
with valid sampling factors and table ids; quantization and Huffman tables whose lengths add up; scans
(SOS) whose components exist in the frame; entropy-coded data that runs to a real marker (byte stuffing
and restart markers skipped); and an EOI. That is what a decoder refuses before it decodes a pixel,
plus truncation: what libjpeg rejects outright. What it does not catch, libjpeg does not reject either:
corrupt entropy-coded data only makes it warn and paint grey blocks (OpenCV returns the image), so a
full decode adds little certainty for about 0.3 ms per 50 KB frame, half the hub's CPU per frame
(docs/adr/0008-hub-image-check-by-structure.md). PNGs and anything not JPEG are decoded in either mode.

``decode`` runs OpenCV's decoder on every image (JPEGs at 1/8 scale: every entropy-coded block is
still read).

Both return (width, height) and raise ImageRejected with a one-line reason.
"""

from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

from hub.errors import ImageRejected

__all__ = ["ImageRejected", "check_image", "decode_dims", "header_dims", "jpeg_structure"]

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}
_DHT, _DQT, _SOS, _EOI, _SOI, _DRI = 0xC4, 0xDB, 0xDA, 0xD9, 0xD8, 0xDD
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _u16(data: bytes, i: int) -> int:
    return (data[i] << 8) | data[i + 1]


def _sof(seg: bytes, marker: int) -> Tuple[int, int, dict]:
    if len(seg) < 6:
        raise ImageRejected("JPEG frame header too short")
    precision, height, width, ncomp = seg[0], _u16(seg, 1), _u16(seg, 3), seg[5]
    if precision not in (8, 12) and not (marker in (0xC3, 0xC7, 0xCB, 0xCF) and 2 <= precision <= 16):
        raise ImageRejected(f"JPEG sample precision {precision} is not supported")
    if width == 0 or height == 0:
        raise ImageRejected(f"JPEG frame size {width}x{height}")
    if ncomp not in (1, 3, 4) or len(seg) != 6 + 3 * ncomp:
        raise ImageRejected(f"JPEG frame header: {ncomp} components in {len(seg)} bytes")
    comps = {}
    for k in range(ncomp):
        cid, sampling, tq = seg[6 + 3 * k], seg[7 + 3 * k], seg[8 + 3 * k]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4) or tq > 3 or cid in comps:
            raise ImageRejected(f"JPEG frame header: bad component {k} (id {cid}, sampling {sampling:#x}, "
                                f"table {tq})")
        comps[cid] = tq
    return width, height, comps


def _dqt(seg: bytes) -> None:
    i = 0
    while i < len(seg):
        pq, tq = seg[i] >> 4, seg[i] & 15
        size = 1 + 64 * (2 if pq else 1)
        if pq > 1 or tq > 3 or i + size > len(seg):
            raise ImageRejected("JPEG quantization table malformed")
        i += size


def _dht(seg: bytes) -> None:
    i = 0
    while i < len(seg):
        if i + 17 > len(seg) or seg[i] >> 4 > 1 or seg[i] & 15 > 3:
            raise ImageRejected("JPEG Huffman table malformed")
        count = sum(seg[i + 1:i + 17])
        if count > 256 or i + 17 + count > len(seg):
            raise ImageRejected("JPEG Huffman table malformed (symbol count)")
        i += 17 + count


def _entropy_end(data: bytes, i: int) -> int:
    """Index of the marker that ends the entropy-coded data starting at ``i``."""
    n = len(data)
    while True:
        j = data.find(b"\xff", i)
        if j < 0 or j + 1 >= n:
            raise ImageRejected("JPEG truncated inside the image data (no end marker)")
        nxt = data[j + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:  # stuffed 0xFF, or a restart marker
            i = j + 2
        elif nxt == 0xFF:                        # fill byte before a marker
            i = j + 1
        else:
            return j


def jpeg_structure(data: bytes) -> Tuple[int, int]:
    """(width, height) of a well-formed JPEG, by its structure alone; ImageRejected otherwise."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != _SOI:
        raise ImageRejected("not a JPEG (no start-of-image marker)")
    i = 2
    size: Optional[Tuple[int, int]] = None
    comps: dict = {}
    scans = 0
    while True:
        if i >= n:
            raise ImageRejected("JPEG truncated (no end-of-image marker)")
        if data[i] != 0xFF:
            raise ImageRejected(f"JPEG: expected a marker at byte {i}")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            raise ImageRejected("JPEG truncated (no end-of-image marker)")
        marker = data[i]
        i += 1
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            continue
        if marker == _SOI or marker == 0x00:
            raise ImageRejected(f"JPEG: unexpected marker 0x{marker:02x} at byte {i - 1}")
        if i + 2 > n:
            raise ImageRejected("JPEG truncated in a segment header")
        length = _u16(data, i)
        if length < 2 or i + length > n:
            raise ImageRejected(f"JPEG segment 0xff{marker:02x} of {length} bytes runs past the end")
        seg = data[i + 2:i + length]
        i += length
        if marker in _SOF:
            if size is not None:
                raise ImageRejected("JPEG with two frame headers")
            w, h, comps = _sof(seg, marker)
            size = (w, h)
        elif marker == _DQT:
            _dqt(seg)
        elif marker == _DHT:
            _dht(seg)
        elif marker == _DRI and len(seg) != 2:
            raise ImageRejected("JPEG restart interval segment malformed")
        elif marker == _SOS:
            if size is None:
                raise ImageRejected("JPEG scan before the frame header")
            ns = seg[0] if seg else 0
            if not 1 <= ns <= 4 or len(seg) != 4 + 2 * ns:
                raise ImageRejected("JPEG scan header malformed")
            for k in range(ns):
                if seg[1 + 2 * k] not in comps:
                    raise ImageRejected("JPEG scan names a component the frame does not have")
            scans += 1
            i = _entropy_end(data, i)
    if size is None or scans == 0:
        raise ImageRejected("JPEG without a frame header or image data")
    return size


def decode_dims(data: bytes, image_format: str) -> Tuple[int, int]:
    """Decode the image with OpenCV (JPEG at 1/8 scale) and return (width, height)."""
    is_jpeg = data[:2] == b"\xff\xd8"
    flags = cv2.IMREAD_REDUCED_GRAYSCALE_8 if is_jpeg else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:  # e.g. absurd dimensions in the header
        raise ImageRejected(f"image ({len(data)} bytes) does not decode: {exc}") from exc
    if img is None or img.size == 0:
        raise ImageRejected(f"image ({len(data)} bytes, {image_format or '?'}) does not decode")
    dims = header_dims(data)  # the reduced decode's shape is 1/8 of a JPEG's real size
    if dims is not None and (dims[0] == 0 or dims[1] == 0):
        raise ImageRejected(f"image ({len(data)} bytes) has size {dims[0]}x{dims[1]}")
    return dims if dims is not None else (int(img.shape[1]), int(img.shape[0]))


def header_dims(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a JPEG SOF or PNG IHDR header without decoding; None when not found."""
    if data[:8] == PNG_MAGIC and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        seg = _u16(data, i + 2)
        if marker in _SOF:
            return _u16(data, i + 7), _u16(data, i + 5)
        i += 2 + seg
    return None


def check_image(data: bytes, image_format: str, mode: str = "structure") -> Tuple[int, int]:
    """(width, height) when ``data`` is a well-formed image; ImageRejected otherwise (see the module doc)."""
    if mode == "structure" and data[:2] == b"\xff\xd8":
        return jpeg_structure(data)
    return decode_dims(data, image_format)
