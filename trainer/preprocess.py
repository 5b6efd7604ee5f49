"""The device preprocessing, as recorded in the bundle's InputSpec - one definition for training,
evaluation and the edge: this module delegates to edge.inference.preprocess (what the device runs).

The trainer stores every image resized to the model input as uint8 pixels in the model's colour order
(`resize_to_input`, = the edge's resize + colour step). The float model is trained on
`normalize(pixels)` (the edge's normalization; `normalize_tf` is the same arithmetic inside tf.data)
and the int8 model is fed `model_input(pixels, spec)`: the edge Preprocessor's exact tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import cv2
import numpy as np

from edge.inference import Preprocessor
from proto.inputspec import InputSpec

# p (0..255) -> r = p * a + b, per normalization (proto/inputspec.py).
NORM: Dict[str, Tuple[float, float]] = {"0_1": (1.0 / 255.0, 0.0), "-1_1": (1.0 / 127.5, -1.0), "raw": (1.0, 0.0)}


def float_spec(spec: InputSpec) -> InputSpec:
    return dataclasses.replace(spec, dtype="float32", scale=0.0, zero_point=0)


def resize_to_input(bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """BGR uint8 frame -> HxWxC uint8 pixels in the spec's colour order and size (edge resize + colour)."""
    raw = dataclasses.replace(float_spec(spec), normalization="raw")
    return Preprocessor(raw)(bgr)[0].astype(np.uint8)


def _to_bgr(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    if pixels.shape[-1] == 1:
        return cv2.cvtColor(pixels[:, :, 0], cv2.COLOR_GRAY2BGR)
    if spec.color_order == "rgb":
        return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    return pixels


def model_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Stored HxWxC pixels -> the exact [1,H,W,C] tensor the edge feeds the model."""
    return Preprocessor(spec)(_to_bgr(pixels, spec))


def normalize(pixels: np.ndarray, normalization: str) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 real values (what the float model sees)."""
    a, b = NORM[normalization]
    return (pixels.astype(np.float32) * np.float32(a) + np.float32(b)).astype(np.float32)


def normalize_tf(pixels: Any, normalization: str) -> Any:
    """Same arithmetic as `normalize`, on a tf float tensor of 0..255 pixels."""
    a, b = NORM[normalization]
    return pixels * a + b


def real_range(normalization: str) -> Tuple[float, float]:
    a, b = NORM[normalization]
    return b, 255.0 * a + b
