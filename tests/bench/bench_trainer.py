"""Trainer benchmark on the real digits data set (sklearn's bundled 8x8 digits, upscaled to 64x64):
accuracy float vs pruned vs int8, sizes (float .tflite, int8, pruned+int8 gzip), latency float vs int8 on
the edge runtime (edge.runtime, ai-edge-litert here), with and without the XNNPACK delegate.

    PYTHONPATH=. .venv/bin/python -m tests.bench.bench_trainer [OUT_DIR]

Targets: int8 <= 0.26 x float bytes; pruned+int8 gzip <= 0.15 x float; int8 accuracy within 1 point of
float; int8 latency <= 0.6 x float.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SETTINGS = {"model.arch": "small_cnn", "model.width": 48, "model.input_size": 64, "train.epochs": 14,
            "train.folds": 0, "train.flip": False, "optimize.sparsity": 0.7, "optimize.prune_epochs": 4,
            "optimize.representative_samples": 200}


def _latency(tflite: bytes, spec: Any, pixels: Any, threads: int, xnnpack: bool, runs: int = 300) -> float:
    """Median ms per invoke, through edge.runtime's Model (xnnpack=False: builtin kernels only)."""
    import numpy as np

    from edge.runtime import Model, load_model
    from proto import kestrel_pb2
    from trainer.preprocess import model_input

    if xnnpack:
        m = load_model(tflite, spec=spec, threads=threads)
    else:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        it = Interpreter(model_content=tflite, num_threads=threads,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        m = Model(it, kestrel_pb2.ModelRef(name="m"), [str(i) for i in range(10)], spec, "ai-edge-litert")
    xs = [model_input(pixels[i], spec) for i in range(16)]
    for x in xs:
        m.invoke(x)
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        m.invoke(xs[i % len(xs)])
        times.append((time.perf_counter() - t0) * 1000)
    m.close()
    return float(np.median(times))


def main(out_dir: str) -> Dict[str, Any]:
    from edge.inputspec import InputSpec
    from trainer import pipeline
    from trainer.config import Config, apply_overrides
    from trainer.datasets import write_digits

    out = Path(out_dir)
    data = write_digits(out / "digits", size=64)
    cfg = apply_overrides(Config(), SETTINGS)
    rundir = out / "run"
    t0 = time.time()
    pipeline.ingest(rundir, [str(data)], cfg)
    pipeline.train(rundir)
    t_train = time.time() - t0
    pipeline.optimize(rundir)
    ev = pipeline.evaluate(rundir)
    pipeline.report(rundir)
    st = ev["stages"]
    ds, _tr, te = pipeline.load_data(rundir)
    lat: Dict[str, Dict[str, float]] = {}
    for name in ("float", "int8", "pruned_int8"):
        model = (rundir / "optimize" / f"{name}.tflite").read_bytes()
        spec = InputSpec.from_dict(st[name]["spec"])
        lat[name] = {f"{'xnnpack' if x else 'builtin'}_t{t}": _latency(model, spec, ds.images[te], t, x)
                     for x in (True, False) for t in (1, 2)}
    fb = st["float"]["bytes"]
    res = {
        "settings": SETTINGS, "images": {"train": int(len(_tr)), "test": int(len(te))},
        "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1),
        "accuracy": {"float": st["float"]["accuracy"], "pruned": st["pruned_float"]["accuracy"],
                     "int8": st["int8"]["accuracy"], "pruned_int8": st["pruned_int8"]["accuracy"]},
        "bytes": {"float": fb, "int8": st["int8"]["bytes"], "pruned_int8": st["pruned_int8"]["bytes"],
                  "pruned_int8_gzip": st["pruned_int8"]["gzip_bytes"]},
        "latency_ms": lat,
    }
    best_float = lat["float"]["xnnpack_t1"]
    res["ratios"] = {
        "int8_bytes_vs_float": st["int8"]["bytes"] / fb,
        "pruned_int8_gzip_vs_float": st["pruned_int8"]["gzip_bytes"] / fb,
        "int8_accuracy_drop_points": (st["float"]["accuracy"] - st["int8"]["accuracy"]) * 100,
        "pruned_int8_accuracy_drop_points": (st["float"]["accuracy"] - st["pruned_int8"]["accuracy"]) * 100,
        "int8_latency_vs_float_xnnpack_t1": lat["pruned_int8"]["xnnpack_t1"] / best_float,
        "int8_latency_vs_float_builtin_t1": lat["pruned_int8"]["builtin_t1"] / lat["float"]["builtin_t1"],
    }
    r = res["ratios"]
    res["targets_met"] = {
        "int8_bytes<=0.26": r["int8_bytes_vs_float"] <= 0.26,
        "pruned_int8_gzip<=0.15": r["pruned_int8_gzip_vs_float"] <= 0.15,
        "int8_accuracy_within_1pt": r["int8_accuracy_drop_points"] <= 1.0,
        "int8_latency<=0.6": r["int8_latency_vs_float_xnnpack_t1"] <= 0.6,
    }
    (out / "bench_trainer.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bench-trainer-")
    print(json.dumps(main(target), indent=2))
