"""The model input contract: one definition used by the trainer (to record it in the bundle), the
edge runtime (to preprocess camera frames) and evaluation. Stored in a bundle manifest as ``input``.

Dict form (bundle manifest ``input``)::

    {"shape": [1, 224, 224, 3], "dtype": "uint8", "scale": 0.0039215, "zero_point": 0,
     "color_order": "rgb", "normalization": "0_1", "resize": "stretch"}

Preprocessing, in order: convert the camera's BGR to ``color_order``; resize to shape[1:3]
(``stretch`` or ``center_crop``); pixels p in 0..255 become real values r by ``normalization``
(0_1: p/255, -1_1: p/127.5-1, raw: p); quantized inputs (scale > 0) become
q = round(r/scale + zero_point) clipped to the dtype's range.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping

DTYPES = ("float32", "uint8", "int8")
COLOR_ORDERS = ("rgb", "bgr")
NORMALIZATIONS = ("0_1", "-1_1", "raw")
RESIZES = ("stretch", "center_crop")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    shape: List[int]
    dtype: str = "float32"
    scale: float = 0.0
    zero_point: int = 0
    color_order: str = "rgb"
    normalization: str = "0_1"
    resize: str = "stretch"

    def __post_init__(self) -> None:
        if len(self.shape) != 4 or self.shape[0] != 1 or self.shape[3] not in (1, 3) or min(self.shape) < 1:
            raise ValueError(f"input shape must be [1, H, W, 1|3], got {self.shape}")
        if self.dtype not in DTYPES:
            raise ValueError(f"input dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.color_order not in COLOR_ORDERS:
            raise ValueError(f"color_order must be one of {COLOR_ORDERS}, got {self.color_order!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {self.resize!r}")
        if self.dtype != "float32" and not self.scale > 0:
            raise ValueError(f"a {self.dtype} input needs a positive quantization scale")

    @property
    def height(self) -> int:
        return int(self.shape[1])

    @property
    def width(self) -> int:
        return int(self.shape[2])

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = [int(x) for x in self.shape]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown input spec key {sorted(unknown)[0]!r}")
        if "shape" not in d:
            raise ValueError("input spec needs shape")
        return cls(
            shape=[int(x) for x in d["shape"]],
            dtype=str(d.get("dtype", "float32")),
            scale=float(d.get("scale", 0.0)),
            zero_point=int(d.get("zero_point", 0)),
            color_order=str(d.get("color_order", "rgb")),
            normalization=str(d.get("normalization", "0_1")),
            resize=str(d.get("resize", "stretch")),
        )
