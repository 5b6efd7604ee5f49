"""The one place the hub, the trainer and the demo import device code from, on purpose.

The trainer evaluates its int8 model through the same interpreter wrapper and the same
preprocessing the device runs (so a bundle's self-test figures are the device's), hashes
training images with the perceptual hash the device's sampler uses for near-duplicates, and
sweeps the sampler's own uncertainty rules (``uncertainty``) over its held-out scores to choose a
bundle's default threshold. Nothing else of ``edge`` may be imported outside ``edge/``
(tests/test_import_direction.py).
"""

from __future__ import annotations

from edge.inference.perceptual import dhash, phash, popcount
from edge.inference.preprocess import Preprocessor
from edge.inference.runtime import Model, load_labels, load_model
from edge.inference.uncertainty import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    FIRES,
    RULES,
    SENDS_MORE_WHEN_HIGHER,
    confidence_fires,
    entropy_fires,
    margin_fires,
    normalized_entropy,
    rule_values,
    top_two,
)

__all__ = ["DEFAULT_CONFIDENCE_THRESHOLD", "FIRES", "Model", "Preprocessor", "RULES", "SENDS_MORE_WHEN_HIGHER",
           "confidence_fires", "dhash", "entropy_fires", "load_labels", "load_model", "margin_fires",
           "normalized_entropy", "phash", "popcount", "rule_values", "top_two"]
