"""Local data sets for tests and the demo (nothing downloads): scikit-learn's bundled digits."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np


def write_digits(out_dir: Union[str, Path], per_class: Optional[int] = None, size: int = 32,
                 classes: Optional[int] = None) -> Path:
    """Write sklearn's 8x8 digits as a class-folder data set of upscaled grey PNGs (out_dir/<digit>/NNNN.png).

    per_class limits the images per class (None = all ~180); classes limits to the first N digits.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    out = Path(out_dir)
    counts: dict = {}
    for img, target in zip(d.images, d.target):
        t = int(target)
        if classes is not None and t >= classes:
            continue
        if per_class is not None and counts.get(t, 0) >= per_class:
            continue
        counts[t] = counts.get(t, 0) + 1
        pix = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
        big = cv2.resize(pix, (size, size), interpolation=cv2.INTER_LINEAR)
        cdir = out / str(t)
        cdir.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(cdir / f"{counts[t]:04d}.png"), big)
    return out
