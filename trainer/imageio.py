"""Reading images of any common mode (grey, RGBA, 16-bit, palette) into 8-bit BGR, strictly.

Truncated files are detected with Pillow's full decode (OpenCV silently pads truncated JPEGs). The EXIF
orientation tag is applied (a phone photo taken upright trains upright), as cameras' JPEGs rely on it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


EXIF_ORIENTATION = 0x0112


def _pil_check(data: bytes) -> Tuple[Optional[str], int]:
    """(problem or None, EXIF orientation 1..8; 1 = as stored)."""
    try:
        import io

        from PIL import Image, ImageFile
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        return None, 1
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                try:
                    orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
                except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
                    orientation = 1
    except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
        return f"{type(exc).__name__}: {exc}", 1
    return None, orientation if 1 <= orientation <= 8 else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decoded array (rows x cols [x channels]) upright per the EXIF orientation tag (as Pillow's
    ImageOps.exif_transpose does)."""
    if orientation == 2:
        out = img[:, ::-1]
    elif orientation == 3:
        out = img[::-1, ::-1]
    elif orientation == 4:
        out = img[::-1]
    elif orientation == 5:
        out = img.swapaxes(0, 1)
    elif orientation == 6:
        out = np.rot90(img, k=-1)
    elif orientation == 7:
        out = img[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        out = np.rot90(img, k=1)
    else:
        out = img
    return np.ascontiguousarray(out)


def to_bgr8(img: np.ndarray) -> np.ndarray:
    """Any decoded array (HxW, HxWx1/3/4, uint8/uint16/float) -> HxWx3 uint8 BGR."""
    if img.dtype == np.uint16:
        img = (img.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        f = img.astype(np.float64)
        if f.max() <= 1.0:
            f = f * 255.0
        img = np.clip(np.round(f), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(img)


def read_image(path: Path) -> Tuple[Optional[np.ndarray], bytes, str]:
    """(bgr8 or None, raw bytes, reason-if-unreadable)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, b"", f"cannot read: {exc.strerror}"
    if not data:
        return None, data, "empty file"
    problem, orientation = _pil_check(data)
    if problem is not None:
        return None, data, f"corrupt or truncated ({problem})"
    # IMREAD_UNCHANGED keeps 16-bit depth and alpha, and ignores EXIF orientation: applied below.
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        return None, data, "OpenCV cannot decode it"
    return apply_orientation(to_bgr8(arr), orientation), data, ""
