"""The stages over a run directory. Each stage reads the previous stage's files and writes its own:

    RUNDIR/config.json                       resolved config (written by ingest)
    RUNDIR/ingest/{dataset.npz,cleaning.json,split.json}
    RUNDIR/train/{float.h5,saved_model/,history.json,cv.json,metrics.json}
    RUNDIR/optimize/{pruned.h5,float.tflite,pruned_float.tflite,int8.tflite,pruned_int8.tflite,optimize.json}
    RUNDIR/evaluate/evaluate.json            accuracies per stage, sizes, latency, gate, self-test cases
    RUNDIR/report/{report.html,*.png,figures.json}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from edge.inputspec import InputSpec
from edge.tomlconf import from_dict, to_dict
from trainer.config import Config
from trainer.errors import RunDirError

Progress = Optional[Callable[..., Any]]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, stage: str) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise RunDirError(f"{path} is missing: run `kestrel-train {stage}` on this run dir first") from exc


def run_config(rundir: Path) -> Config:
    return from_dict(Config, read_json(rundir / "config.json", "ingest"))


def base_spec(cfg: Config) -> InputSpec:
    m = cfg.model
    return InputSpec(shape=[1, m.input_size, m.input_size, m.channels], dtype="float32",
                     color_order=m.color_order, normalization=m.normalization, resize=m.resize)


# ---------------------------------------------------------------- ingest

def ingest(rundir: Path, sources: List[str], cfg: Config, progress: Progress = None) -> Dict[str, Any]:
    from trainer.ingest import check_enough, clean, scan_sources
    from trainer.split import holdout_split

    scan = scan_sources(sources)
    ds, report = clean(scan, base_spec(cfg), cfg.data.min_side, cfg.data.phash_distance, progress)
    check_enough(ds, cfg.train.folds)
    train_idx, test_idx = holdout_split(ds.labels, ds.groups, cfg.data.test_fraction, cfg.data.seed)
    rundir.mkdir(parents=True, exist_ok=True)
    write_json(rundir / "config.json", to_dict(cfg))
    (rundir / "ingest").mkdir(exist_ok=True)
    ds.save(rundir / "ingest" / "dataset.npz")
    report["split"] = {"train": int(len(train_idx)), "test": int(len(test_idx))}
    write_json(rundir / "ingest" / "cleaning.json", report)
    write_json(rundir / "ingest" / "split.json", {"train": train_idx.tolist(), "test": test_idx.tolist()})
    return report


def load_data(rundir: Path) -> tuple:
    from trainer.ingest import Dataset

    p = rundir / "ingest" / "dataset.npz"
    if not p.is_file():
        raise RunDirError(f"{p} is missing: run `kestrel-train ingest --data DIR --out {rundir}` first")
    ds = Dataset.load(p)
    split = read_json(rundir / "ingest" / "split.json", "ingest")
    return ds, np.array(split["train"], np.int64), np.array(split["test"], np.int64)


# ---------------------------------------------------------------- train

def _EpochBar(progress: Callable[..., Any], epochs: int) -> Any:  # noqa: N802 - a class factory
    """A Keras callback advancing a progress bar per epoch (shows loss/accuracy)."""
    from trainer.tfenv import tf

    class EpochBar(tf().keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = progress(total=epochs, desc="train", unit="epoch")

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_accuracy")})
            self.bar.update(1)

        def on_train_end(self, logs: Any = None) -> None:
            self.bar.close()

    return EpochBar()


def train(rundir: Path, progress: Progress = None) -> Dict[str, Any]:
    from trainer.models import check_weights
    from trainer.train import cross_validate, fit, metrics, predict_float

    cfg = run_config(rundir)
    check_weights(cfg.model)
    ds, tr, te = load_data(rundir)
    n = len(ds.class_names)
    cv = cross_validate(ds.images[tr], ds.labels[tr], ds.groups[tr], n, cfg, progress)
    write_json(rundir / "train" / "cv.json", cv)
    callbacks = [_EpochBar(progress, cfg.train.epochs)] if progress is not None else []
    model, history = fit(ds.images[tr], ds.labels[tr], n, cfg, cfg.train.epochs,
                         val=(ds.images[te], ds.labels[te]), seed=cfg.data.seed, callbacks=callbacks)
    m = metrics(ds.labels[te], predict_float(model, ds.images[te], cfg).argmax(1), n)
    out = rundir / "train"
    model.save(str(out / "float.h5"))
    model.save(str(out / "saved_model"), save_format="tf")
    write_json(out / "history.json", history)
    write_json(out / "metrics.json", {"test": m, "class_names": ds.class_names})
    return {"cv": cv, "test": m}


# ---------------------------------------------------------------- optimize

def _load_keras(path: Path, stage: str) -> Any:
    from trainer.tfenv import tf, tfmot

    if not path.is_file():
        raise RunDirError(f"{path} is missing: run `kestrel-train {stage}` on this run dir first")
    tfmot()
    return tf().keras.models.load_model(str(path), compile=False)


def optimize(rundir: Path, progress: Progress = None, rep_override: Any = None) -> Dict[str, Any]:
    from trainer import optimize as opt

    cfg = run_config(rundir)
    ds, tr, _te = load_data(rundir)
    model = _load_keras(rundir / "train" / "float.h5", "train")
    out = rundir / "optimize"
    steps = ["float", "int8", "prune"] + (["qat"] if cfg.optimize.qat else []) + ["pruned_int8"]
    bar = progress(total=len(steps), desc="optimize", unit="step") if progress else None
    rep = rep_override or opt.representative(ds.images[tr], cfg, cfg.optimize.representative_samples)

    def step(name: str) -> None:
        if bar is not None:
            bar.set_postfix_str(name)
            bar.update(1)

    write_bytes(out / "float.tflite", opt.to_tflite(model))
    step("float")
    write_bytes(out / "int8.tflite", opt.to_tflite(model, rep, cfg.optimize.io_dtype))
    step("int8")
    info: Dict[str, Any] = {"qat": cfg.optimize.qat}
    if cfg.optimize.sparsity > 0:
        pruned, sched, hist = opt.prune(model, ds.images[tr], ds.labels[tr], cfg)
        info.update(schedule=sched, prune_history=hist)
    else:
        pruned = model
        info["schedule"] = {"final_sparsity": 0.0, "explained": "pruning disabled (sparsity = 0)"}
    info["sparsity"] = opt.sparsity_of(pruned)
    pruned.save(str(out / "pruned.h5"))
    write_bytes(out / "pruned_float.tflite", opt.to_tflite(pruned))
    step("prune")
    final = pruned
    if cfg.optimize.qat:
        final = opt.prune_preserving_qat(pruned, ds.images[tr], ds.labels[tr], cfg)
        step("qat")
    write_bytes(out / "pruned_int8.tflite", opt.to_tflite(final, rep, cfg.optimize.io_dtype))
    step("pruned_int8")
    if bar is not None:
        bar.close()
    write_json(out / "optimize.json", info)
    return info


# ---------------------------------------------------------------- evaluate

STAGES = ("float", "pruned_float", "int8", "pruned_int8")


def evaluate(rundir: Path, progress: Progress = None) -> Dict[str, Any]:
    from trainer import evaluate as ev
    from trainer.optimize import gzip_size

    cfg = run_config(rundir)
    ds, _tr, te = load_data(rundir)
    n = len(ds.class_names)
    base = base_spec(cfg)
    result: Dict[str, Any] = {"stages": {}, "class_names": ds.class_names}
    it = STAGES if progress is None else progress(STAGES, desc="evaluate", unit="model")
    for name in it:
        p = rundir / "optimize" / f"{name}.tflite"
        if not p.is_file():
            raise RunDirError(f"{p} is missing: run `kestrel-train optimize {rundir}` first")
        data = p.read_bytes()
        spec = ev.spec_of(data, base)
        m = ev.evaluate_tflite(data, spec, ds.images[te], ds.labels[te], n)
        result["stages"][name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "confusion": m["confusion"],
                                  "bytes": len(data), "gzip_bytes": gzip_size(data),
                                  "latency": ev.latency_ms(data, spec, ds.images[te], runs=30),
                                  "spec": spec.to_dict()}
    g = ev.gate(result["stages"]["float"]["accuracy"], result["stages"]["pruned_int8"]["accuracy"],
                cfg.gate.max_accuracy_drop)
    result["gate"] = g
    deployed = (rundir / "optimize" / "pruned_int8.tflite").read_bytes()
    spec = InputSpec.from_dict(result["stages"]["pruned_int8"]["spec"])
    result["self_test"] = {"cases": ev.self_test_cases(deployed, spec, ds.images[te], ds.labels[te],
                                                       cfg.gate.self_test_cases),
                           "tolerance": cfg.gate.self_test_tolerance,
                           "latency_budget_ms": cfg.gate.latency_budget_ms or max(
                               50.0, 20.0 * result["stages"]["pruned_int8"]["latency"]["p90_ms"])}
    write_json(rundir / "evaluate" / "evaluate.json", result)
    return result


# ---------------------------------------------------------------- report

def report(rundir: Path) -> Path:
    from trainer.report import write_report

    return write_report(rundir)


# ---------------------------------------------------------------- package

def package(rundir: Path, key_path: str, version: int, out: Path, allow_failed_gate: bool = False) -> Dict[str, Any]:
    from edge import bundle, keys
    from trainer.evaluate import enforce_gate

    cfg = run_config(rundir)
    signing_key = keys.load_private_key(key_path)   # refuses loose permissions before any work
    ev = read_json(rundir / "evaluate" / "evaluate.json", "evaluate")
    if not allow_failed_gate:
        enforce_gate(ev["gate"])
    model_bytes = (rundir / "optimize" / "pruned_int8.tflite").read_bytes()
    spec = InputSpec.from_dict(ev["stages"]["pruned_int8"]["spec"])
    cv = read_json(rundir / "train" / "cv.json", "train")
    st = ev["stages"]
    metrics = {
        "accuracy": st["pruned_int8"]["accuracy"], "macro_f1": st["pruned_int8"]["macro_f1"],
        "float_accuracy": st["float"]["accuracy"], "accuracy_drop_points": ev["gate"]["drop_points"],
        "cv_accuracy_mean": (cv.get("accuracy") or {}).get("mean"),
        "cv_accuracy_std": (cv.get("accuracy") or {}).get("std"),
        "cv_k": cv.get("k"), "bytes": len(model_bytes),
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    data = bundle.build_bundle(
        model_bytes=model_bytes, labels=ev["class_names"], model_name=cfg.gate.model_name, version=int(version),
        input_spec=spec, signing_key=signing_key, default_threshold=cfg.gate.default_threshold,
        metrics=metrics, self_test=ev["self_test"], expires_in_s=int(cfg.gate.expires_in_days * 86400))
    write_bytes(out, data)
    return {"bundle": str(out), "bytes": len(data), "version": int(version), "metrics": metrics}
