"""64-bit perceptual hashes for near-duplicate suppression.

``dhash``: grey, area-averaged down to 9x8, one bit per horizontal neighbour comparison (fast,
robust to brightness/colour changes and JPEG noise). ``phash``: grey 32x32, DCT, the 8x8 low frequencies
compared with their median. Both return a Python int in 0..2**64-1; compare with :func:`hamming`.
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
    """Area-average the grey image down to 9x8 and compare horizontal neighbours.

    The image is first cropped (centred) to a whole multiple of 9x8, so OpenCV's integer-factor
    area resize applies: the same block averages, about five times faster than the fractional
    one on a 224x224 thumbnail (it runs on the inference thread for every low-confidence frame).
    """
    grey = _grey(bgr)
    h, w = grey.shape[:2]
    fx, fy = w // 9, h // 8
    if fx >= 1 and fy >= 1:
        x0, y0 = (w - 9 * fx) // 2, (h - 8 * fy) // 2
        grey = grey[y0:y0 + 8 * fy, x0:x0 + 9 * fx]
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    return _pack(small[:, 1:] > small[:, :-1])


def phash(bgr: np.ndarray) -> int:
    small = cv2.resize(_grey(bgr), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].reshape(-1)
    med = np.median(low[1:])
    return _pack(low > med)


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1")
