"""Trainer benchmark on one real data set: all 1797 of scikit-learn's bundled 8x8 digits (10 classes),
upscaled to 96x96, MobileNetV2 (alpha 1.0, per-tensor int8 weights) trained from scratch through the pipeline.

Figures (the issue's): accuracy float vs pruned vs int8 (and the deployed pruned+int8) on the held-out
split; sizes float .tflite, int8, pruned+int8 gzip; latency float vs int8 on the edge runtime on this CPU.
Targets: int8 <= 0.26 x float bytes; pruned+int8 gzip <= 0.15 x float; int8 accuracy within 1 point of
float; int8 latency <= 0.6 x float. "int8" in the accuracy and latency targets is the model a bundle
ships (pruned_int8); the plain int8 figures are reported beside it.

To explain the results it also measures: where the int8 bytes go (weights, biases, quantization
parameters), the same pruned model with per-channel weight scales and with int8 I/O, and latency with and without the
XNNPACK delegate, 1 and 2 threads, on ai-edge-litert here and on tflite-runtime 2.14 under Python 3.8
(the oldest runtime in the fleet), also at larger inputs (untrained, latency only) - each model timed in
interleaved rounds so load from other processes hits every model alike. Analysis: docs/trainer.md,
"Benchmark".

    PYTHONPATH=. .venv/bin/python -m tests.bench.run --only bench_trainer --out /tmp/bench-trainer
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[2]
PY38 = REPO / ".venv38" / "bin" / "python"
PY38_READY = (REPO / ".venv38" / ".stamp").exists()  # make touches it after the last install
SIZE = 96
# MobileNetV2 at alpha 1.0 (the standard width) with per-tensor weight scales: the configuration that meets the
# issue's targets here (the gate checks what per-tensor costs in accuracy). The per-channel twin of the deployed
# model is measured beside it; docs/trainer.md also records the thin alpha 0.35 network, which misses two.
SETTINGS: Dict[str, Any] = {
    "model.arch": "mobilenet_v2", "model.alpha": 1.0, "optimize.per_channel": False,
    "model.input_size": SIZE, "model.normalization": "-1_1",
    "train.epochs": 12, "train.folds": 0, "train.flip": False, "train.learning_rate": 2e-3,
    "optimize.sparsity": 0.8, "optimize.prune_epochs": 6, "optimize.representative_samples": 200,
}
# Latency only (weights do not change dense-kernel timings): the same architecture, untrained, at larger inputs.
SWEEP_SIZES = (160, 224)
ALT = "pruned_int8_per_channel" if not SETTINGS["optimize.per_channel"] else "pruned_int8_per_tensor"
MODELS = ("float", "int8", "pruned_int8", ALT, "pruned_int8_int8_io")
ROUNDS = 7
RUNS_PER_ROUND = 40

# Runs under .venv (ai-edge-litert) and .venv38 (tflite-runtime 2.14): interleaved rounds per setting.
LATENCY_SCRIPT = r'''
import json, sys, time
import numpy as np
try:
    from tflite_runtime.interpreter import Interpreter, OpResolverType
    import tflite_runtime as rt_mod
    runtime = "tflite-runtime " + rt_mod.__version__
except ImportError:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    runtime = "ai-edge-litert"
job = json.load(open(sys.argv[1]))
out = {"runtime": runtime, "ms": {}, "delegated": {}}
for resolver in ("xnnpack", "builtin"):
    for threads in (1, 2):
        its = {}
        for name, c in job["models"].items():
            kw = {} if resolver == "xnnpack" else {
                "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
            it = Interpreter(model_path=c["path"], num_threads=threads, **kw)
            it.allocate_tensors()
            d = it.get_input_details()[0]
            x = np.load(c["input"]).astype(d["dtype"]).reshape(d["shape"])
            for _ in range(10):
                it.set_tensor(d["index"], x); it.invoke()
            its[name] = (it, d["index"], x)
            if threads == 1:
                ops = [o["op_name"] for o in it._get_ops_details()]
                out["delegated"][f"{name}|{resolver}"] = "DELEGATE" in ops
        rounds = {name: [] for name in its}
        for _ in range(job["rounds"]):
            for name, (it, idx, x) in its.items():
                ts = []
                for _ in range(job["runs"]):
                    t0 = time.perf_counter(); it.set_tensor(idx, x); it.invoke(); ts.append(time.perf_counter() - t0)
                rounds[name].append(float(np.median(ts)) * 1000.0)
        for name, vals in rounds.items():
            out["ms"][f"{name}|{resolver}|t{threads}"] = round(float(np.median(vals)), 4)
print(json.dumps(out))
'''


def anatomy(tflite: bytes) -> Dict[str, int]:
    """Where a .tflite's bytes go: constant buffers by dtype, quantization parameters, the rest (graph)."""
    from tensorflow.lite.python import schema_py_generated as fb

    m = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(tflite, 0))
    names = {0: "float32", 2: "int32", 3: "uint8", 9: "int8", 4: "int64"}
    out: Dict[str, int] = {}
    seen = set()
    qparams = 0
    for sg in m.subgraphs:
        for t in sg.tensors:
            data = m.buffers[t.buffer].data
            if data is not None and len(data) and t.buffer not in seen:
                seen.add(t.buffer)
                key = f"{names.get(t.type, str(t.type))}_constants"
                out[key] = out.get(key, 0) + len(data)
            q = t.quantization
            if q is not None and q.scale is not None:
                # float32 scale + int64 zero point per entry: per-channel weights have one per output channel
                qparams += len(q.scale) * 4 + (len(q.zeroPoint) * 8 if q.zeroPoint is not None else 0)
    out["quantization_params_approx"] = qparams
    out["total"] = len(tflite)
    return out


def _latency(job_models: Dict[str, Dict[str, str]], python: str, work: Path) -> Dict[str, Any]:
    (work / "job.json").write_text(json.dumps({"models": job_models, "rounds": ROUNDS, "runs": RUNS_PER_ROUND}))
    (work / "lat.py").write_text(LATENCY_SCRIPT)
    proc = subprocess.run([python, str(work / "lat.py"), str(work / "job.json")], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _edge_runtime_latency(models: Dict[str, bytes], specs: Dict[str, Any], x: Dict[str, Any]) -> Dict[str, float]:
    """Median ms per invoke through edge.inference.runtime.load_model (what the daemon runs), 1 thread, interleaved."""
    import numpy as np

    from edge.inference.runtime import load_model

    loaded = {n: load_model(b, spec=specs[n], threads=1) for n, b in models.items()}
    for n, m in loaded.items():
        for _ in range(10):
            m.invoke(x[n])
    rounds: Dict[str, List[float]] = {n: [] for n in loaded}
    for _ in range(ROUNDS):
        for n, m in loaded.items():
            ts = []
            for _ in range(RUNS_PER_ROUND):
                t0 = time.perf_counter()
                m.invoke(x[n])
                ts.append(time.perf_counter() - t0)
            rounds[n].append(float(np.median(ts)) * 1000.0)
    runtime = next(iter(loaded.values())).runtime
    for m in loaded.values():
        m.close()
    return {"runtime": runtime, **{n: round(float(np.median(v)), 4) for n, v in rounds.items()}}


def main(out_dir: str) -> Dict[str, Any]:
    import numpy as np

    from trainer import optimize as opt
    from trainer import pipeline
    from trainer import rundir as rundir_io
    from trainer.config import Config, apply_overrides
    from trainer.datasets import write_digits
    from trainer.evaluate import evaluate_tflite
    from trainer.preprocess import model_input

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = write_digits(out / "digits", size=SIZE)
    cfg = apply_overrides(Config(), SETTINGS)
    rundir = out / "run"
    times: Dict[str, float] = {}
    t0 = time.time()
    pipeline.ingest(rundir, [str(data)], cfg)
    for stage in ("train", "optimize", "evaluate"):
        t = time.time()
        getattr(pipeline, stage)(rundir)
        times[stage] = round(time.time() - t, 1)
    pipeline.report(rundir)
    ev = json.loads((rundir / "evaluate" / "evaluate.json").read_text())
    st = ev["stages"]
    ds, tr, te = rundir_io.load_data(rundir)
    n_classes = len(ds.class_names)

    # The same pruned model with the other kind of weight scales (per-channel <-> per-tensor).
    pruned = pipeline._load_keras(rundir / "optimize" / "pruned.h5", "optimize")
    rep = opt.representative(ds.images[tr], cfg, cfg.optimize.representative_samples)
    alt = opt.to_tflite(pruned, rep, cfg.optimize.io_dtype, per_channel=not cfg.optimize.per_channel)
    (rundir / "optimize" / f"{ALT}.tflite").write_bytes(alt)
    # ... and with int8 instead of uint8 input/output (no QUANTIZE ops at the graph's ends).
    other_io = "int8" if cfg.optimize.io_dtype == "uint8" else "uint8"
    (rundir / "optimize" / "pruned_int8_int8_io.tflite").write_bytes(opt.to_tflite(pruned, rep, other_io))
    base = rundir_io.base_spec(cfg)
    from trainer.evaluate import spec_of

    models = {n: (rundir / "optimize" / f"{n}.tflite").read_bytes() for n in MODELS}
    specs = {n: spec_of(b, base) for n, b in models.items()}
    alt_metrics = evaluate_tflite(alt, specs[ALT], ds.images[te], ds.labels[te],
                                 n_classes)

    # Latency: the daemon's own loader here, then every runtime x resolver x threads.
    xs = {n: model_input(ds.images[te][0], specs[n]) for n in MODELS}
    edge_rt = _edge_runtime_latency(models, specs, xs)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        job = {}
        for n in MODELS:
            np.save(work / f"{n}.npy", xs[n])
            job[n] = {"path": str(rundir / "optimize" / f"{n}.tflite"), "input": str(work / f"{n}.npy")}
        lat_litert = _latency(job, sys.executable, work)
        lat_214 = _latency(job, str(PY38), work) if PY38_READY else {"error": f"{PY38} is absent or incomplete"}

    # How the int8/float latency ratio moves with the amount of compute per layer (input size).
    sweep: Dict[str, Any] = {}
    for size in SWEEP_SIZES:
        scfg = apply_overrides(cfg, {"model.input_size": size})
        from trainer.models import build_model
        from trainer.tfenv import tf

        m = build_model(scfg.model, n_classes, seed=0)
        imgs = np.random.default_rng(0).integers(0, 256, (16, size, size, 3)).astype(np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            job = {}
            for name, blob in (("float", opt.to_tflite(m)),
                               ("int8", opt.to_tflite(m, opt.representative(imgs, scfg, 16), scfg.optimize.io_dtype))):
                (work / f"{name}.tflite").write_bytes(blob)
                sp = spec_of(blob, rundir_io.base_spec(scfg))
                np.save(work / f"{name}.npy", model_input(imgs[0], sp))
                job[name] = {"path": str(work / f"{name}.tflite"), "input": str(work / f"{name}.npy")}
            sweep[str(size)] = {"ai_edge_litert": _latency(job, sys.executable, work),
                                "tflite_runtime_2_14": _latency(job, str(PY38), work) if PY38_READY else {}}
        tf().keras.backend.clear_session()
    sweep["96 (the trained models above)"] = {"ai_edge_litert": lat_litert, "tflite_runtime_2_14": lat_214}

    fb = st["float"]["bytes"]
    acc = {"float": st["float"]["accuracy"], "pruned_float": st["pruned_float"]["accuracy"],
           "int8": st["int8"]["accuracy"], "pruned_int8": st["pruned_int8"]["accuracy"],
           ALT: alt_metrics["accuracy"]}
    res: Dict[str, Any] = {
        "dataset": f"sklearn digits, {len(ds.labels)} images, {n_classes} classes, upscaled to {SIZE}x{SIZE}",
        "settings": SETTINGS, "images": {"train": int(len(tr)), "test": int(len(te))},
        "stage_seconds": times, "total_seconds": round(time.time() - t0, 1),
        "sparsity": json.loads((rundir / "optimize" / "optimize.json").read_text())["sparsity"]["overall"],
        "accuracy": acc,
        "bytes": {"float": fb, "int8": st["int8"]["bytes"], "pruned_int8": st["pruned_int8"]["bytes"],
                  "pruned_int8_gzip": st["pruned_int8"]["gzip_bytes"], "int8_gzip": st["int8"]["gzip_bytes"],
                  ALT: len(alt), f"{ALT}_gzip": opt.gzip_size(alt)},
        "anatomy": {n: anatomy(models[n]) for n in MODELS},
        "latency_ms": {"edge_runtime_t1": edge_rt, "ai_edge_litert": lat_litert, "tflite_runtime_2_14": lat_214},
    }
    res["int8_vs_float_latency_by_input_size"] = {
        size: {rt: {k: round(v["ms"][f"{'pruned_int8' if 'pruned_int8|xnnpack|t1' in v['ms'] else 'int8'}|{k}"]
                             / v["ms"][f"float|{k}"], 3)
                    for k in ("xnnpack|t1", "builtin|t1")}
               for rt, v in by_rt.items() if v.get("ms")}
        for size, by_rt in sweep.items()}
    res["latency_sweep_ms"] = sweep
    drop = {k: (acc["float"] - v) * 100.0 for k, v in acc.items() if k != "float"}
    r = {
        "int8_bytes_vs_float": st["int8"]["bytes"] / fb,
        "pruned_int8_bytes_vs_float": st["pruned_int8"]["bytes"] / fb,
        f"{ALT}_bytes_vs_float": len(alt) / fb,
        "int8_weights_vs_float_weights": (res["anatomy"]["int8"].get("int8_constants", 0)
                                          / max(1, res["anatomy"]["float"].get("float32_constants", 1))),
        "pruned_int8_gzip_vs_float": st["pruned_int8"]["gzip_bytes"] / fb,
        f"{ALT}_gzip_vs_float": opt.gzip_size(alt) / fb,
        "accuracy_drop_points": drop,
        "deployed_latency_vs_float_edge_runtime_t1": edge_rt["pruned_int8"] / edge_rt["float"],
        "int8_latency_vs_float_edge_runtime_t1": edge_rt["int8"] / edge_rt["float"],
    }
    for label, lat in (("ai_edge_litert", lat_litert), ("tflite_runtime_2_14", lat_214)):
        ms = lat.get("ms", {})
        for resolver in ("xnnpack", "builtin"):
            for t in (1, 2):
                f = ms.get(f"float|{resolver}|t{t}")
                q = ms.get(f"pruned_int8|{resolver}|t{t}")
                if f and q:
                    r[f"deployed_latency_vs_float_{label}_{resolver}_t{t}"] = q / f
    res["ratios"] = r
    res["targets_met"] = {
        "int8_bytes<=0.26x_float": r["int8_bytes_vs_float"] <= 0.26,
        "pruned_int8_gzip<=0.15x_float": r["pruned_int8_gzip_vs_float"] <= 0.15,
        "deployed_int8_accuracy_within_1pt": drop["pruned_int8"] <= 1.0,
        "deployed_int8_latency<=0.6x_float(edge runtime here)": r["deployed_latency_vs_float_edge_runtime_t1"] <= 0.6,
    }
    if "deployed_latency_vs_float_tflite_runtime_2_14_xnnpack_t1" in r:
        res["targets_met"]["deployed_int8_latency<=0.6x_float(tflite-runtime 2.14)"] = (
            r["deployed_latency_vs_float_tflite_runtime_2_14_xnnpack_t1"] <= 0.6)
    res["gate"] = ev["gate"]
    (out / "bench_trainer.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bench-trainer-")
    print(json.dumps(main(target), indent=2))
