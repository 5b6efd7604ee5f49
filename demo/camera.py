"""The demo's camera and its ground truth: held-out sklearn digits played as a video file.

The trainer learns from the first ``train_per_class`` digits of each class (``kestrel-train digits``
writes exactly those); the camera shows the *other* digits of the same classes, so what the device sees
was never trained on. Each camera frame is one digit, upscaled and written as MJPG (what a USB camera
delivers). The :class:`Oracle` plays the person who labels frames on the hub: it finds the digit a
stored frame shows by nearest neighbour against the camera's 8x8 originals, whose classes it knows.
Nothing downloads: the digits ship inside scikit-learn.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import cv2
import numpy as np


def held_out_digits(classes: int, train_per_class: int, seed: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images 8x8 uint8 0..255, targets) of the digits ``kestrel-train digits --per-class N [--seed S]``
    leaves out (the same choice: trainer.datasets.digit_indices)."""
    from sklearn.datasets import load_digits

    from trainer.datasets import digit_indices

    d = load_digits()
    taken = set(digit_indices(d.target, train_per_class, classes, seed))
    imgs: List[np.ndarray] = []
    targets: List[int] = []
    for i, (img, target) in enumerate(zip(d.images, d.target)):
        if int(target) >= classes or i in taken:
            continue
        imgs.append(np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8))
        targets.append(int(target))
    return np.stack(imgs), np.asarray(targets, np.int64)


def render(img8: np.ndarray, size: int) -> np.ndarray:
    """One camera frame (BGR) showing an 8x8 digit upscaled to ``size`` pixels."""
    big = cv2.resize(img8, (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)


def write_video(path: Path, imgs: np.ndarray, size: int = 128, fps: float = 20.0, seed: int = 7) -> List[int]:
    """Write the digits as an MJPG .avi in a shuffled order; returns the order (indices into ``imgs``)."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(imgs))]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))  # type: ignore[attr-defined]
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an MJPG video to {path}")
    try:
        for i in order:
            writer.write(render(imgs[i], size))
    finally:
        writer.release()
    return order


class Oracle:
    """Finds the camera digit a frame shows (the nearest held-out digit); its target is what a person would
    label the frame."""

    def __init__(self, imgs: np.ndarray, targets: np.ndarray) -> None:
        self.flat = imgs.reshape(len(imgs), -1).astype(np.float32)
        self.targets = targets

    def index(self, bgr_or_grey: np.ndarray) -> int:
        grey = bgr_or_grey if bgr_or_grey.ndim == 2 else cv2.cvtColor(bgr_or_grey, cv2.COLOR_BGR2GRAY)
        small = cv2.resize(grey, (8, 8), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(1, -1)
        return int(np.argmin(((self.flat - small) ** 2).sum(axis=1)))

    def find(self, encoded: bytes) -> Optional[int]:
        """The index of the camera digit an encoded frame shows; None if it does not decode."""
        img = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_GRAYSCALE)
        return None if img is None else self.index(img)
