"""The loop of demo/loop.py on the brightness test models: fast and with a ground truth.

The brightness models' confidence follows the mean brightness of the frame, so the test pattern gives a
predictable mix of confident and low-confidence frames, and a stored frame's label (its grey level) can
be read off its pixels. The demo (``make demo``) runs the same loop on a model the trainer trained.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from demo.loop import DEVICE_ID, GROUP, Loop, LoopError, Proc

MODEL_NAME = "brightness"
LABELS = ["bright", "dark", "mid"]
# Test pattern: mostly bright frames (confident) with mid-grey ones (~1/3 each = low confidence).
PATTERN = [0.9, 0.9, 0.5, 0.9, 0.1, 0.5, 0.9, 0.45, 0.9, 0.55]


def self_test_cases(model_path: Path, levels: Sequence[float] = (0.9, 0.1, 0.5)) -> Dict[str, Any]:
    """Self-test cases as the trainer computes them: the model's own scores on the edge runtime."""
    from edge.inference.runtime import load_model
    from tests.helpers.bundles import BRIGHTNESS_SPEC

    m = load_model(str(model_path), spec=BRIGHTNESS_SPEC, labels=LABELS, threads=1)
    try:
        cases = []
        for level in levels:
            x = np.full(BRIGHTNESS_SPEC.shape, int(level * 255), np.uint8)
            cases.append({"input": base64.b64encode(x.tobytes()).decode("ascii"),
                          "expected": [float(v) for v in m.invoke(x)]})
    finally:
        m.close()
    return {"tolerance": 0.02, "cases": cases, "latency_budget_ms": None}


class BrightnessLoop(Loop):
    """:class:`demo.loop.Loop` with the brightness test models, a test-pattern camera and grey-level labels."""

    def __init__(self, work: Path, models_dir: Path, device_id: str = DEVICE_ID, group: str = GROUP) -> None:
        super().__init__(work, device_id, group)
        self.models_dir = Path(models_dir)

    def bundle(self, version: int, model: str = "brightness_int8") -> bytes:
        from proto import bundle as bundlemod
        from proto import keys
        from tests.helpers.bundles import BRIGHTNESS_SPEC

        if self.priv_path is None:
            raise LoopError("make_keys() first")
        path = self.models_dir / f"{model}.tflite"
        if not path.is_file():
            raise LoopError(f"test model {path} is missing: run `python -m tests.helpers.models --out "
                            f"{self.models_dir}` first")
        return bundlemod.build_bundle(
            model_bytes=path.read_bytes(), labels=LABELS, model_name=MODEL_NAME, version=version,
            input_spec=BRIGHTNESS_SPEC, signing_key=keys.load_private_key(self.priv_path),
            default_threshold=0.6, metrics={"source": model}, self_test=self_test_cases(path))

    def start_brightness_edge(self) -> Proc:
        """A freshly flashed device (no model: it waits for the hub) on the test pattern (160x120 at 25 fps)."""
        cfg = self.write_edge_config(
            source={"kind": "testpattern", "name": "cam0", "width": 160, "height": 120, "fps": 25.0,
                    "pattern_brightness": PATTERN},
            model={"threads": 1}, sampler={"max_per_minute": 600, "max_per_hour": 6000})
        return self.start_edge(cfg)

    def label(self, frames: Sequence[Any]) -> Dict[str, int]:
        """Label frames by the test pattern's ground truth: the frame's mean grey level (0.45 / 0.5 / 0.55
        for the low-confidence levels of PATTERN) - what a person looking at them would decide."""
        import cv2

        from hub.labels import set_label

        counts: Dict[str, int] = {}
        for f in frames:
            rec = self.store.get_frame(f.frame_id)
            img = cv2.imdecode(np.frombuffer(rec.image, np.uint8), cv2.IMREAD_GRAYSCALE) if rec else None
            if img is None:
                raise LoopError(f"stored frame {f.frame_id} has no decodable image")
            mean = float(img.mean()) / 255.0
            name = "bright" if mean > 0.525 else "dark" if mean < 0.475 else "mid"
            set_label(self.store, f.frame_id, name)
            counts[name] = counts.get(name, 0) + 1
        return counts
