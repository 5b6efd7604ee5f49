"""The one place the hub, the trainer and the demo import device code from, on purpose.

The trainer evaluates its int8 model through the same interpreter wrapper and the same
preprocessing the device runs (so a bundle's self-test figures are the device's), and hashes
training images with the perceptual hash the device's sampler uses for near-duplicates. Nothing
else of ``edge`` may be imported outside ``edge/`` (tests/test_import_direction.py).
"""

from __future__ import annotations

from edge.inference.perceptual import dhash, phash, popcount
from edge.inference.preprocess import Preprocessor
from edge.inference.runtime import Model, load_labels, load_model

__all__ = ["Model", "Preprocessor", "dhash", "load_labels", "load_model", "phash", "popcount"]
