"""Does the model's confidence mean anything? Reliability bins and the expected calibration error (ECE).
Pure: scores and labels in, numbers out.

The held-out frames are binned by their top score (``BINS`` equal-width bins over 0..1); per bin the mean
top score (what the model claims) and the accuracy (how often it is right). A calibrated model's points
lie on the diagonal. ECE = sum over bins of (frames in bin / all frames) x |accuracy - mean confidence|
(Guo et al. 2017): 0 is perfect; 0.05 means the confidence is off by 5 points on average. A sampling
threshold on the confidence is only as meaningful as this is small.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

BINS = 10


def reliability(scores: np.ndarray, labels: np.ndarray, bins: int = BINS) -> Dict[str, Any]:
    """Per-bin count, mean top score and accuracy (None for empty bins), and the ECE."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    top = s.max(axis=1)
    right = s.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds (edges[i], edges[i+1]]; a top score of exactly 0 goes to the first bin
    idx = np.clip(np.searchsorted(edges, top, side="left") - 1, 0, bins - 1)
    out: List[Dict[str, Any]] = []
    ece = 0.0
    n = len(top)
    for i in range(bins):
        m = idx == i
        k = int(m.sum())
        conf = float(top[m].mean()) if k else None
        acc = float(right[m].mean()) if k else None
        if k:
            ece += k / n * abs(acc - conf)  # type: ignore[operator]
        out.append({"low": float(edges[i]), "high": float(edges[i + 1]), "count": k, "confidence": conf,
                    "accuracy": acc})
    return {"bins": out, "ece": float(ece) if n else None, "n": int(n),
            "mean_confidence": float(top.mean()) if n else None, "accuracy": float(right.mean()) if n else None}
