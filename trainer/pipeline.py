"""The stages over a run directory. Each stage reads the previous stage's files and writes its own:

    RUNDIR/config.json                       resolved config (written by ingest)
    RUNDIR/ingest/{dataset.npz,cleaning.json,split.json,lineage.json}
    RUNDIR/train/{float.h5,saved_model/,input_spec.json,history.json,cv.json,metrics.json,lineage.json}
    RUNDIR/optimize/{pruned.h5,float.tflite,pruned_float.tflite,int8.tflite,pruned_int8.tflite,optimize.json,
                     lineage.json}
    RUNDIR/evaluate/{evaluate.json,lineage.json}   accuracies per stage, sizes, latency, gate, self-test cases
    RUNDIR/report/{report.html,*.png,figures.json}

Lineage: each stage finishes by writing ``STAGE/lineage.json`` with the sha256 of the files it read and
wrote and a hash of the config sections it depends on. The next stage (and ``package``) first checks
that record against the disk and the current config, so a re-run or edited earlier stage can never
flow into a later one unnoticed: above all, ``package`` signs only the exact model ``evaluate`` gated,
with the input spec and self-test cases measured on it.

Every file is written with edge.atomic (temp file in the same directory, fsync, rename, directory
fsync; mode 0644): a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np

from edge import atomic
from edge.inputspec import InputSpec
from edge.tomlconf import from_dict, to_dict
from trainer.config import Config
from trainer.errors import DataError, RunDirError

Progress = Optional[Callable[..., Any]]

# Config sections each stage's outputs depend on (cumulative). Packaging-only gate fields (model name,
# threshold, expiry) may change after evaluate.
PACKAGE_ONLY = ("model_name", "default_threshold", "expires_in_days")
ALL = None
STAGE_CONFIG: Dict[str, Dict[str, Optional[tuple]]] = {
    "ingest": {"data": ALL, "model": ("input_size", "channels", "color_order", "resize")},
    "train": {"data": ALL, "model": ALL, "train": ALL},
    "optimize": {"data": ALL, "model": ALL, "train": ALL, "optimize": ALL},
    "evaluate": {"data": ALL, "model": ALL, "train": ALL, "optimize": ALL, "gate": ALL},
}


def write_json(path: Path, data: Any) -> None:
    atomic.write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data)


def read_json(path: Path, stage: str) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise RunDirError(f"{path} is missing: run `kestrel-train {stage}` on this run dir first") from exc
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path} is unreadable ({exc}): run `kestrel-train {stage}` on this run dir again") from exc


def run_config(rundir: Path) -> Config:
    return from_dict(Config, read_json(rundir / "config.json", "ingest"))


def base_spec(cfg: Config) -> InputSpec:
    m = cfg.model
    return InputSpec(shape=[1, m.input_size, m.input_size, m.channels], dtype="float32",
                     color_order=m.color_order, normalization=m.normalization, resize=m.resize)


def check_writable_dir(path: Path, what: str) -> None:
    """Fail fast (before any long work) when `path` cannot become a writable directory."""
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"{what} {p}: {probe} is a file, not a directory: choose another path")
    if not os.access(str(probe), os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {p}: {probe} is not writable: choose another path or fix its permissions")


# ---------------------------------------------------------------- lineage

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        return ""
    return h.hexdigest()


def config_hash(cfg: Config, stage: str) -> str:
    """Hash of the config fields `stage`'s outputs depend on."""
    d = to_dict(cfg)
    doc = {}
    for section, fields in STAGE_CONFIG[stage].items():
        doc[section] = {k: v for k, v in d[section].items()
                        if (fields is None or k in fields) and not (section == "gate" and k in PACKAGE_ONLY)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _digests(rundir: Path, paths: Iterable[Path], known: Optional[Dict[Path, str]]) -> Dict[str, str]:
    known = known or {}
    return {str(p.relative_to(rundir)): known.get(p) or sha256_file(p) for p in paths}


def write_lineage(rundir: Path, stage: str, cfg: Config, inputs: Iterable[Path], outputs: Iterable[Path],
                  known: Optional[Dict[Path, str]] = None) -> None:
    """Record what `stage` read and wrote (sha256; `known` = digests of bytes already in memory)."""
    write_json(rundir / stage / "lineage.json", {
        "stage": stage, "config": config_hash(cfg, stage),
        "inputs": _digests(rundir, inputs, known), "outputs": _digests(rundir, outputs, known)})


def check_lineage(rundir: Path, stage: str, cfg: Config) -> Dict[str, Any]:
    """Refuse to build on `stage`'s outputs unless they, their inputs and their config are what it recorded."""
    lin = rundir / stage / "lineage.json"
    hint = f"kestrel-train {stage} {rundir}" if stage != "ingest" else f"kestrel-train ingest --data DIR --out {rundir}"
    if not lin.is_file():
        raise RunDirError(f"{lin} is missing (`{stage}` has not finished on this run dir): run `{hint}` first")
    rec = read_json(lin, stage)
    if rec.get("config") != config_hash(cfg, stage):
        raise RunDirError(f"config.json changed after `{stage}` ran (in {', '.join(STAGE_CONFIG[stage])}): "
                          f"run `{hint}` and the later stages again")
    for kind in ("inputs", "outputs"):
        for rel, digest in rec.get(kind, {}).items():
            if sha256_file(rundir / rel) != digest:
                raise RunDirError(f"{rundir / rel} changed after `{stage}` ran: run `{hint}` and the later "
                                  "stages again")
    return dict(rec)


def save_keras(model: Any, path: Path) -> None:
    """Keras .h5, written to a temp name, fsynced, then renamed into place."""
    tmp = atomic.temp_name(path)
    try:
        model.save(str(tmp), save_format="h5")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(str(tmp), str(path))
    finally:
        if tmp.exists():
            tmp.unlink()
    atomic.fsync_dir(path.parent)


def save_saved_model(model: Any, path: Path, spec: InputSpec, labels: List[str]) -> None:
    """The float SavedModel (for TF Serving users) with its input contract beside the graph, swapped in whole:
    the previous one is moved aside, and deleted only once the new one is in place (put back if not)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    try:
        model.save(str(tmp), save_format="tf")
        write_json(tmp / INPUT_CONTRACT, input_contract(spec, labels))
        atomic.fsync_tree(tmp)
        had_old = path.exists()
        if had_old:
            os.replace(str(path), str(old))
        try:
            os.replace(str(tmp), str(path))
        except BaseException:
            if had_old:
                os.replace(str(old), str(path))
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic.fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


INPUT_CONTRACT = "kestrel_input_spec.json"


def input_contract(spec: InputSpec, labels: List[str]) -> Dict[str, Any]:
    return {"input": spec.to_dict(), "labels": list(labels), "input_name": "image",
            "how": "BGR frame -> color_order -> resize (stretch | center_crop) to shape[1:3] -> float32 by "
                   "normalization (0_1: p/255, -1_1: p/127.5-1, raw: p); output = softmax scores in label order "
                   "(edge/inputspec.py)"}


# ---------------------------------------------------------------- ingest

def ingest(rundir: Path, sources: List[str], cfg: Config, progress: Progress = None) -> Dict[str, Any]:
    from trainer.ingest import check_enough, clean, scan_sources
    from trainer.split import check_split, holdout_split

    check_writable_dir(rundir, "run dir")
    scan = scan_sources(sources)
    ds, report = clean(scan, base_spec(cfg), cfg.data.min_side, cfg.data.phash_distance, progress)
    check_enough(ds, cfg.train.folds)
    train_idx, test_idx = holdout_split(ds.labels, ds.groups, cfg.data.test_fraction, cfg.data.seed)
    check_split(ds.labels, ds.groups, train_idx, test_idx, ds.class_names, cfg.train.folds)
    report["split"] = {"train": int(len(train_idx)), "test": int(len(test_idx)),
                       "test_per_class": {name: int((ds.labels[test_idx] == i).sum())
                                          for i, name in enumerate(ds.class_names)}}
    warn = gate_resolution_warning(len(test_idx), cfg.gate.max_accuracy_drop)
    if warn:
        report["warnings"].append(warn)
    rundir.mkdir(parents=True, exist_ok=True)
    write_json(rundir / "config.json", to_dict(cfg))
    write_bytes(rundir / "ingest" / "dataset.npz", ds.to_bytes())
    write_json(rundir / "ingest" / "cleaning.json", report)
    write_json(rundir / "ingest" / "split.json", {"train": train_idx.tolist(), "test": test_idx.tolist()})
    write_lineage(rundir, "ingest", cfg, [], [rundir / "ingest" / "dataset.npz", rundir / "ingest" / "split.json"])
    return report


def gate_resolution_warning(n_test: int, max_drop_points: float) -> str:
    """One held-out image is worth 100 / n_test accuracy points; above the gate tolerance, a single image
    decides the verdict."""
    per_image = 100.0 / max(1, n_test)
    if per_image <= max_drop_points:
        return ""
    need = int(np.ceil(100.0 / max_drop_points)) if max_drop_points > 0 else None
    return (f"the held-out test split has {n_test} images: one image is {per_image:.2f} accuracy points, more than "
            f"the gate tolerance {max_drop_points:g}, so a single image decides the gate"
            + (f"; use at least {need} test images (more data or a larger --test-fraction)" if need else ""))


def load_data(rundir: Path) -> tuple:
    from trainer.ingest import Dataset

    p = rundir / "ingest" / "dataset.npz"
    if not p.is_file():
        raise RunDirError(f"{p} is missing: run `kestrel-train ingest --data DIR --out {rundir}` first")
    try:
        ds = Dataset.load(p)
    except (OSError, ValueError, KeyError) as exc:
        raise RunDirError(f"{p} is unreadable ({exc}): run `kestrel-train ingest` again") from exc
    split = read_json(rundir / "ingest" / "split.json", "ingest")
    return ds, np.array(split["train"], np.int64), np.array(split["test"], np.int64)


# ---------------------------------------------------------------- train

def _EpochBar(progress: Callable[..., Any], epochs: int) -> Any:  # noqa: N802 - a class factory
    """A Keras callback advancing a progress bar per epoch (shows loss/accuracy)."""
    from trainer.tfenv import tf

    class EpochBar(tf().keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: Any = None) -> None:
            if not hasattr(self, "bar"):
                self.bar = progress(total=epochs, desc="train", unit="epoch")

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_accuracy")})
            self.bar.update(1)
            if self.bar.n >= epochs:
                self.bar.close()

    return EpochBar()


def train(rundir: Path, progress: Progress = None) -> Dict[str, Any]:
    from trainer.models import check_weights
    from trainer.train import cross_validate, fit, metrics, predict_float, total_epochs

    cfg = run_config(rundir)
    check_lineage(rundir, "ingest", cfg)
    check_weights(cfg.model)
    ds, tr, te = load_data(rundir)
    n = len(ds.class_names)
    cv = cross_validate(ds.images[tr], ds.labels[tr], ds.groups[tr], n, cfg, progress)
    out = rundir / "train"
    write_json(out / "cv.json", cv)
    callbacks = [_EpochBar(progress, total_epochs(cfg, cfg.train.epochs))] if progress is not None else []
    model, history = fit(ds.images[tr], ds.labels[tr], n, cfg, cfg.train.epochs,
                         val=(ds.images[te], ds.labels[te]), seed=cfg.data.seed, callbacks=callbacks)
    m = metrics(ds.labels[te], predict_float(model, ds.images[te], cfg).argmax(1), n)
    save_keras(model, out / "float.h5")
    save_saved_model(model, out / "saved_model", base_spec(cfg), ds.class_names)
    write_json(out / "input_spec.json", input_contract(base_spec(cfg), ds.class_names))
    write_json(out / "history.json", history)
    write_json(out / "metrics.json", {"test": m, "class_names": ds.class_names})
    write_lineage(rundir, "train", cfg, [rundir / "ingest" / "dataset.npz", rundir / "ingest" / "split.json"],
                  [out / "float.h5"])
    return {"cv": cv, "test": m}


# ---------------------------------------------------------------- optimize

def _load_keras(path: Path, stage: str) -> Any:
    from trainer.tfenv import tf, tfmot

    if not path.is_file():
        raise RunDirError(f"{path} is missing: run `kestrel-train {stage}` on this run dir first")
    tfmot()
    return tf().keras.models.load_model(str(path), compile=False)


TFLITES = ("float", "int8", "pruned_float", "pruned_int8")


def optimize(rundir: Path, progress: Progress = None, rep_override: Any = None) -> Dict[str, Any]:
    from trainer import optimize as opt

    cfg = run_config(rundir)
    check_lineage(rundir, "train", cfg)
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
    oc = cfg.optimize
    write_bytes(out / "int8.tflite", opt.to_tflite(model, rep, oc.io_dtype, oc.per_channel))
    step("int8")
    info: Dict[str, Any] = {"qat": oc.qat, "io_dtype": oc.io_dtype, "per_channel": oc.per_channel,
                            "converter": opt.converter_settings()}
    if cfg.optimize.sparsity > 0:
        pruned, sched, hist = opt.prune(model, ds.images[tr], ds.labels[tr], cfg)  # trains `model` in place
        info.update(schedule=sched, prune_history=hist)
    else:
        pruned = model
        info["schedule"] = {"final_sparsity": 0.0, "explained": "pruning disabled (sparsity = 0)"}
    info["sparsity"] = opt.sparsity_of(pruned)
    save_keras(pruned, out / "pruned.h5")
    write_bytes(out / "pruned_float.tflite", opt.to_tflite(pruned))
    step("prune")
    final = pruned
    if cfg.optimize.qat:
        final = opt.prune_preserving_qat(pruned, ds.images[tr], ds.labels[tr], cfg)
        step("qat")
    write_bytes(out / "pruned_int8.tflite", opt.to_tflite(final, rep, oc.io_dtype, oc.per_channel))
    step("pruned_int8")
    if bar is not None:
        bar.close()
    write_json(out / "optimize.json", info)
    write_lineage(rundir, "optimize", cfg,
                  [rundir / "train" / "float.h5", rundir / "ingest" / "dataset.npz", rundir / "ingest" / "split.json"],
                  [out / f"{name}.tflite" for name in TFLITES] + [out / "pruned.h5"])
    return info


# ---------------------------------------------------------------- evaluate

STAGES = ("float", "pruned_float", "int8", "pruned_int8")
DEPLOYED = "pruned_int8"


def evaluate(rundir: Path, progress: Progress = None) -> Dict[str, Any]:
    """Every .tflite on the held-out split through the edge runtime; the gate; the self-test cases.

    Each model's bytes are read once: the accuracy, the input spec, the self-test scores and the sha256
    recorded for `package` all describe those same bytes."""
    from trainer import evaluate as ev
    from trainer.optimize import gzip_size

    cfg = run_config(rundir)
    check_lineage(rundir, "optimize", cfg)
    ds, _tr, te = load_data(rundir)
    n = len(ds.class_names)
    base = base_spec(cfg)
    models: Dict[str, bytes] = {}
    for name in STAGES:
        p = rundir / "optimize" / f"{name}.tflite"
        if not p.is_file():
            raise RunDirError(f"{p} is missing: run `kestrel-train optimize {rundir}` first")
        models[name] = p.read_bytes()
    result: Dict[str, Any] = {"stages": {}, "class_names": ds.class_names, "n_test": int(len(te)), "warnings": []}
    it = STAGES if progress is None else progress(STAGES, desc="evaluate", unit="model")
    for name in it:
        data = models[name]
        spec = ev.spec_of(data, base)
        m = ev.evaluate_tflite(data, spec, ds.images[te], ds.labels[te], n)
        result["stages"][name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "confusion": m["confusion"],
                                  "bytes": len(data), "gzip_bytes": gzip_size(data),
                                  "latency": ev.latency_ms(data, spec, ds.images[te], runs=30),
                                  "spec": spec.to_dict(), "sha256": hashlib.sha256(data).hexdigest()}
    g = ev.gate(result["stages"]["float"]["accuracy"], result["stages"][DEPLOYED]["accuracy"],
                cfg.gate.max_accuracy_drop)
    g["n_test"] = int(len(te))
    g["points_per_test_image"] = 100.0 / max(1, len(te))
    warn = gate_resolution_warning(len(te), cfg.gate.max_accuracy_drop)
    if warn:
        result["warnings"].append(warn)
    result["gate"] = g
    spec = InputSpec.from_dict(result["stages"][DEPLOYED]["spec"])
    result["deployed"] = {"file": f"optimize/{DEPLOYED}.tflite", "sha256": result["stages"][DEPLOYED]["sha256"]}
    # No latency budget by default: a desktop's timing says nothing about a Jetson's; the device applies
    # its own update.self_test_latency_ms (and the smaller of the two when the bundle sets one).
    result["self_test"] = {"cases": ev.self_test_cases(models[DEPLOYED], spec, ds.images[te], ds.labels[te],
                                                       cfg.gate.self_test_cases),
                           "tolerance": cfg.gate.self_test_tolerance,
                           "latency_budget_ms": cfg.gate.latency_budget_ms or None}
    write_json(rundir / "evaluate" / "evaluate.json", result)
    known = {rundir / "optimize" / f"{k}.tflite": result["stages"][k]["sha256"] for k in STAGES}
    write_lineage(rundir, "evaluate", cfg,
                  [rundir / "optimize" / f"{k}.tflite" for k in STAGES]
                  + [rundir / "ingest" / "dataset.npz", rundir / "ingest" / "split.json"],
                  [rundir / "evaluate" / "evaluate.json"], known)
    return result


# ---------------------------------------------------------------- report

def report(rundir: Path) -> Path:
    from trainer.report import write_report

    return write_report(rundir)


# ---------------------------------------------------------------- package

def package(rundir: Path, key_path: str, version: int, out: Path, allow_failed_gate: bool = False) -> Dict[str, Any]:
    """Sign exactly the model `evaluate` measured and gated, with its input spec and self-test cases."""
    from edge import bundle, keys
    from trainer.evaluate import enforce_gate

    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"bundle version must be an integer >= 1, got {version!r}")
    cfg = run_config(rundir)
    signing_key = keys.load_private_key(key_path)   # refuses loose permissions before any work
    check_writable_dir(Path(out).parent, "bundle folder")
    rec = check_lineage(rundir, "evaluate", cfg)
    ev = read_json(rundir / "evaluate" / "evaluate.json", "evaluate")
    if not allow_failed_gate:
        enforce_gate(ev["gate"])
    model_path = rundir / "optimize" / f"{DEPLOYED}.tflite"
    try:
        model_bytes = model_path.read_bytes()
    except OSError as exc:
        raise RunDirError(f"cannot read {model_path}: {exc.strerror}: run `kestrel-train optimize` and "
                          "`evaluate` again") from exc
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != ev.get("deployed", {}).get("sha256") or digest != rec["inputs"].get(f"optimize/{DEPLOYED}.tflite"):
        raise RunDirError(f"{model_path} is not the model `evaluate` measured: run `kestrel-train evaluate "
                          f"{rundir}` again before packaging")
    if not ev["self_test"]["cases"]:
        raise RunDirError("evaluate.json has no self-test cases (devices refuse such bundles): run "
                          f"`kestrel-train evaluate {rundir}` again")
    spec = InputSpec.from_dict(ev["stages"][DEPLOYED]["spec"])
    cv = read_json(rundir / "train" / "cv.json", "train")
    st = ev["stages"]
    metrics = {
        "accuracy": st[DEPLOYED]["accuracy"], "macro_f1": st[DEPLOYED]["macro_f1"],
        "float_accuracy": st["float"]["accuracy"], "accuracy_drop_points": ev["gate"]["drop_points"],
        "cv_accuracy_mean": (cv.get("accuracy") or {}).get("mean"),
        "cv_accuracy_std": (cv.get("accuracy") or {}).get("std"),
        "cv_k": cv.get("k"), "bytes": len(model_bytes), "n_test": ev.get("n_test"),
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    data = bundle.build_bundle(
        model_bytes=model_bytes, labels=ev["class_names"], model_name=cfg.gate.model_name, version=int(version),
        input_spec=spec, signing_key=signing_key, default_threshold=cfg.gate.default_threshold,
        metrics=metrics, self_test=ev["self_test"], expires_in_s=int(cfg.gate.expires_in_days * 86400))
    write_bytes(Path(out), data)
    return {"bundle": str(out), "bytes": len(data), "version": int(version), "metrics": metrics}
