"""Benchmark-size models: MobileNetV2 int8 (uint8 in/out, random weights) at a chosen input size and width.

``mobilenet_path(size, alpha)`` returns the cached ``.tflite`` in the test-models dir, building it
first (in a subprocess, so the benchmark process never imports TensorFlow) when it is missing.
``python -m tests.bench.bench_models --size 160 --alpha 0.5 [--out DIR]`` builds one by hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def models_dir() -> Path:
    env = os.environ.get("KESTREL_TEST_MODELS")
    return Path(env) if env else REPO / ".cache" / "test-models"


def model_name(size: int, alpha: float) -> str:
    return f"bench_mnv2_{size}_a{int(round(alpha * 100)):03d}_int8.tflite"


def build(out: Path, size: int, alpha: float) -> Path:
    """Build (TensorFlow, in this process) and atomically write the model; returns its path."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from tests.helpers.models import convert

    tf.keras.utils.set_random_seed(0)
    net = tf.keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, weights=None, classes=3)
    data = convert(tf, net, int8=True, size=size)
    out.mkdir(parents=True, exist_ok=True)
    path = out / model_name(size, alpha)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def mobilenet_path(size: int, alpha: float, out: Path | None = None) -> Path:
    """The cached model, built in a subprocess when missing."""
    out = out or models_dir()
    path = out / model_name(size, alpha)
    if not path.exists():
        subprocess.run([sys.executable, "-m", "tests.bench.bench_models", "--size", str(size), "--alpha",
                        str(alpha), "--out", str(out)], cwd=str(REPO), check=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, required=True, help="input side in pixels")
    ap.add_argument("--alpha", type=float, required=True, help="MobileNetV2 width multiplier")
    ap.add_argument("--out", type=Path, default=models_dir())
    ns = ap.parse_args()
    print(build(ns.out, ns.size, ns.alpha))


if __name__ == "__main__":
    main()
