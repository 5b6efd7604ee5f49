"""Import TensorFlow the way tfmot needs it: legacy Keras 2 (tf.keras = tf_keras), quiet logs."""

from __future__ import annotations

import os
from typing import Any, Optional


def tf() -> Any:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


def tfmot() -> Any:
    tf()
    import tensorflow_model_optimization

    return tensorflow_model_optimization


_determinism = False


def configure(deterministic: bool, seed: Optional[int] = None) -> None:
    """Process-wide TensorFlow settings a run asks for (``[train] deterministic``): op determinism makes
    training reproducible from the seeds (without it, two runs on the same data differed by up to 9
    accuracy points on the demo's 90 held-out digits). Called before any training; idempotent. ``seed``
    (deterministic only): seed Python, NumPy and TensorFlow now, so a stage gives the same result whether
    it runs inside ``kestrel-train run`` or on its own (random ops refuse to run unseeded then)."""
    global _determinism
    if deterministic and not _determinism:
        tf().config.experimental.enable_op_determinism()
        _determinism = True
    if deterministic and seed is not None:
        tf().keras.utils.set_random_seed(seed)
