"""The sampler's uncertainty rules as pure math: numbers in, numbers out (no config, no state).

The device's sampler (edge.pipeline.sampler) decides with these functions, and the trainer sweeps the
very same functions over its held-out scores to choose a bundle's ``default_threshold``
(trainer/threshold.py), so what the report predicts is what the device does. Each rule reduces a score
vector to one value and fires on a comparison with its threshold:

* ``confidence``: the top score; fires when ``top < threshold``;
* ``margin``: top-1 minus top-2; fires when ``margin < threshold``;
* ``entropy``: the normalized entropy (0 = certain, 1 = uniform); fires when ``entropy > threshold``.

The ``*_fires`` comparisons work on a float or elementwise on a numpy array of values.
"""

from __future__ import annotations

import math
from typing import Tuple, TypeVar, Union

import numpy as np

DEFAULT_CONFIDENCE_THRESHOLD = 0.6  # when neither the device config nor the model's bundle sets one
RULES = ("confidence", "margin", "entropy")

Value = TypeVar("Value", float, np.ndarray)
Fired = Union[bool, np.ndarray]


def top_two(scores: np.ndarray) -> Tuple[float, float]:
    """(highest, second highest) score; the second is 0.0 for a single score."""
    s = np.asarray(scores).reshape(-1)
    if s.size < 2:
        return (float(s[0]) if s.size else 0.0), 0.0
    two = np.partition(s, s.size - 2)[-2:]
    return float(two[1]), float(two[0])


def normalized_entropy(scores: np.ndarray) -> float:
    """Shannon entropy of the (renormalized, clipped) scores divided by log(n): 0 = certain, 1 = uniform."""
    s = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, None)
    n = s.size
    total = s.sum()
    if n < 2 or total <= 0:
        return 1.0 if n >= 2 else 0.0
    p = s / total
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(n))


def confidence_fires(top: Value, threshold: float) -> Fired:
    """The ``confidence`` rule: the top score is below the threshold."""
    return top < threshold


def margin_fires(margin: Value, threshold: float) -> Fired:
    """The ``margin`` rule: top-1 minus top-2 is below the threshold."""
    return margin < threshold


def entropy_fires(entropy: Value, threshold: float) -> Fired:
    """The ``entropy`` rule: the normalized entropy is above the threshold."""
    return entropy > threshold


FIRES = {"confidence": confidence_fires, "margin": margin_fires, "entropy": entropy_fires}
# +1: a higher threshold sends more frames (confidence, margin); -1: a lower one does (entropy)
SENDS_MORE_WHEN_HIGHER = {"confidence": True, "margin": True, "entropy": False}


def rule_values(scores: np.ndarray) -> Tuple[float, float, float]:
    """(top, margin, normalized entropy) of one score vector: what each rule compares."""
    top, second = top_two(scores)
    return top, top - second, normalized_entropy(scores)
