"""Import TensorFlow the way tfmot needs it: legacy Keras 2 (tf.keras = tf_keras), quiet logs."""

from __future__ import annotations

import os
from typing import Any


def tf() -> Any:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


def tfmot() -> Any:
    tf()
    import tensorflow_model_optimization

    return tensorflow_model_optimization
