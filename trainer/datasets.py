"""Local data sets for tests and the demo (nothing downloads): scikit-learn's bundled digits."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import cv2
import numpy as np


def digit_indices(targets: np.ndarray, per_class: Optional[int] = None, classes: Optional[int] = None,
                  seed: Optional[int] = None) -> List[int]:
    """Which of the digits (indices into ``targets``, in their order) a data set of ``per_class`` per class
    takes: the first ones of each class, or with ``seed`` a seeded random choice within each class.

    The digits are roughly grouped by writer, so the first N of each class come from few writers and the
    rest from others; a random choice makes the chosen and the left-out digits the same kind of images (what
    a held-out split must be for its figures to say anything about the rest)."""
    t = np.asarray(targets).astype(int)
    rng = np.random.default_rng(seed) if seed is not None else None
    chosen: List[int] = []
    for c in sorted(set(t.tolist())):
        if classes is not None and c >= classes:
            continue
        idx = np.nonzero(t == c)[0]
        if per_class is not None and per_class < len(idx):
            idx = np.sort(rng.choice(idx, per_class, replace=False)) if rng is not None else idx[:per_class]
        chosen.extend(int(i) for i in idx)
    return sorted(chosen)


def write_digits(out_dir: Union[str, Path], per_class: Optional[int] = None, size: int = 32,
                 classes: Optional[int] = None, seed: Optional[int] = None) -> Path:
    """Write sklearn's 8x8 digits as a class-folder data set of upscaled grey PNGs (out_dir/<digit>/NNNN.png).

    per_class limits the images per class (None = all ~180): the first ones, or a seeded random choice with
    ``seed`` (:func:`digit_indices`); classes limits to the first N digits.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    out = Path(out_dir)
    counts: dict = {}
    for i in digit_indices(d.target, per_class, classes, seed):
        t = int(d.target[i])
        counts[t] = counts.get(t, 0) + 1
        pix = np.clip(d.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        big = cv2.resize(pix, (size, size), interpolation=cv2.INTER_LINEAR)
        cdir = out / str(t)
        cdir.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(cdir / f"{counts[t]:04d}.png"), big)
    return out
