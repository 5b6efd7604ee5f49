"""Image-writing helpers for the trainer tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def pattern(seed: int, size: int = 24, channels: int = 3) -> np.ndarray:
    """A distinct random blocky image (different seeds -> far apart perceptual hashes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, channels), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return img if channels > 1 else img.reshape(size, size)


def write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def class_folders(root: Path, classes: dict, size: int = 24, seed0: int = 0) -> Path:
    """root/<class>/<i>.png with `classes[name]` distinct images each."""
    s = seed0
    for name, n in classes.items():
        for i in range(n):
            write(root / name / f"{i:03d}.png", pattern(s, size))
            s += 1
    return root
