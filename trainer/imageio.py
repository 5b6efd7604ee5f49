"""Reading images of any common mode (grey, RGBA, 16-bit, palette) into 8-bit BGR, strictly.

Truncated files are detected with Pillow's full decode (OpenCV silently pads truncated JPEGs).
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


def _pil_check(data: bytes) -> Optional[str]:
    try:
        import io

        from PIL import Image, ImageFile
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        return None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
        return f"{type(exc).__name__}: {exc}"
    return None


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
    problem = _pil_check(data)
    if problem is not None:
        return None, data, f"corrupt or truncated ({problem})"
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        return None, data, "OpenCV cannot decode it"
    return to_bgr8(arr), data, ""
