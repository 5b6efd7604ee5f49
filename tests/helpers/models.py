"""Small real TFLite models for tests and benchmarks, converted by the trainer's converter and cached.

``python -m tests.helpers.models --out DIR`` writes them (make test does this first, under the
Python that has TensorFlow) so the Python 3.8 device run finds them without TensorFlow.

Models (all 64x64x3 RGB input in [0, 1] unless said otherwise):
* ``brightness_float.tflite`` / ``brightness_int8.tflite`` (uint8 in/out): 3 classes whose
  confidence follows the mean brightness m of the frame: m near 0.5 gives ~1/3 each (low
  confidence), m >= 0.8 gives class 0 ("bright") above 0.95, m <= 0.2 class 1 ("dark").
* ``brightness_sint8.tflite``: the same network with *signed* int8 input and output (what
  converters produce with ``inference_input_type = tf.int8``): zero points around -128.
* ``uniform_int8.tflite``: always ~1/3 each (a model that is "always low confidence").
* ``nan_float.tflite``: the brightness network with NaN dense weights: every score is NaN, on the
  real interpreter (a broken export; float only: NaN weights cannot be quantized).
* ``slow_int8.tflite``: same answers as brightness but with a heavy conv stack (much slower).
* ``mobilenet_int8.tflite`` / ``mobilenet_float.tflite``: MobileNetV2 alpha 0.35 at 96x96,
  random weights, for benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

LABELS = ["bright", "dark", "mid"]
SIZE = 64
_STAMP = "stamp.json"


REPO = Path(__file__).resolve().parents[2]
# Everything the cached models depend on: this file and the trainer's converter settings.
SOURCES = (Path(__file__).resolve(), REPO / "trainer" / "optimize.py")


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in SOURCES:
        h.update(p.read_bytes() if p.exists() else b"missing:" + p.name.encode())
    return h.hexdigest()[:16]


def _tf():
    from trainer.tfenv import tf

    return tf()


def _brightness_model(tf, heavy: bool = False, uniform: bool = False, nan: bool = False):
    keras = tf.keras
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = inp
    if heavy:
        # A heavy identity-ish branch: adds compute, its result is scaled to ~0 then added back.
        y = inp
        for _ in range(6):
            y = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(y)
        y = keras.layers.Conv2D(3, 1, padding="same", kernel_initializer="zeros", bias_initializer="zeros")(y)
        x = keras.layers.Add()([inp, y])
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3, name="logits")
    logits = dense(pooled)
    out = keras.layers.Softmax(name="scores")(logits)
    model = keras.Model(inp, out)
    import numpy as np

    if uniform:
        w = np.zeros((3, 3), np.float32)
        b = np.zeros(3, np.float32)
    elif nan:
        w = np.full((3, 3), np.nan, np.float32)
        b = np.zeros(3, np.float32)
    else:
        w = np.array([[4, -4, 0]] * 3, np.float32)
        b = np.array([-6, 6, 0], np.float32)
    dense.set_weights([w, b])
    return model


def _representative(np, n: int = 64, size: int = SIZE):
    rng = np.random.default_rng(0)

    def gen():
        for i in range(n):
            level = (i % 16) / 15.0
            img = np.clip(level + rng.normal(0, 0.05, (1, size, size, 3)), 0, 1).astype(np.float32)
            yield [img]

    return gen


def convert(tf, model, int8: bool, size: int = SIZE, io_dtype: str = "uint8") -> bytes:
    """Through the trainer's own converter (trainer.optimize.to_tflite): the settings bundles ship with."""
    import numpy as np

    from trainer.optimize import to_tflite

    del tf
    return to_tflite(model, _representative(np, size=size) if int8 else None, io_dtype=io_dtype)


def build_all(out: Path, force: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / _STAMP
    want = {"source": _source_hash()}
    if not force and stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    tf = _tf()
    tf.keras.utils.set_random_seed(0)
    files = {
        "brightness_float.tflite": convert(tf, _brightness_model(tf), int8=False),
        "brightness_int8.tflite": convert(tf, _brightness_model(tf), int8=True),
        "brightness_sint8.tflite": convert(tf, _brightness_model(tf), int8=True, io_dtype="int8"),
        "uniform_int8.tflite": convert(tf, _brightness_model(tf, uniform=True), int8=True),
        "nan_float.tflite": convert(tf, _brightness_model(tf, nan=True), int8=False),
        "slow_int8.tflite": convert(tf, _brightness_model(tf, heavy=True), int8=True),
    }
    mnet = tf.keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=3)
    files["mobilenet_float.tflite"] = convert(tf, mnet, int8=False, size=96)
    files["mobilenet_int8.tflite"] = convert(tf, mnet, int8=True, size=96)
    for name, data in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out / name)
    (out / "labels.txt").write_text("\n".join(LABELS) + "\n")
    stamp.write_text(json.dumps(want))
    return out


def default_dir() -> Path:
    env = os.environ.get("KESTREL_TEST_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "test-models"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default_dir())
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    path = build_all(args.out, force=args.force)
    print(f"test models in {path}")


if __name__ == "__main__":
    main()
