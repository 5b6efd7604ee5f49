"""The stages over a run directory. Each stage reads the previous stage's files and writes its own:

    RUNDIR/config.json                       resolved config (written by ingest)
    RUNDIR/ingest/{dataset.npz,cleaning.json,split.json,lineage.json}
    RUNDIR/train/{float.h5,saved_model/,input_spec.json,history.json,cv.json,metrics.json,lineage.json}
    RUNDIR/optimize/{pruned.h5,float.tflite,pruned_float.tflite,int8.tflite,pruned_int8.tflite,optimize.json,
                     lineage.json}
    RUNDIR/evaluate/{evaluate.json,lineage.json}   accuracies per stage, sizes, latency, gate, self-test cases
    RUNDIR/report/{report.html,*.png,figures.json}

Lineage (trainer/rundir.py): each stage finishes by writing ``STAGE/lineage.json`` with the sha256 of the
files it read and wrote and a hash of the config sections it depends on. The next stage (and ``package``)
first checks that record against the disk and the current config, so a re-run or edited earlier stage can
never flow into a later one unnoticed: above all, ``package`` signs only the exact model ``evaluate``
gated, with the input spec and self-test cases measured on it.

Every file is written atomically (proto.atomic: temp file in the same directory, fsync, rename, directory
fsync; mode 0644): a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from proto import atomic
from proto.inputspec import InputSpec
from proto.tomlconf import to_dict
from trainer.config import Config
from trainer.errors import DataError, RunDirError
from trainer.rundir import (
    base_spec,
    check_lineage,
    check_writable_dir,
    input_contract,
    load_data,
    read_json,
    run_config,
    save_keras,
    save_saved_model,
    write_lineage,
)

Progress = Optional[Callable[..., Any]]

# The four models optimize writes (optimize/NAME.tflite) and evaluate measures, in report order.
STAGES = ("float", "pruned_float", "int8", "pruned_int8")
DEPLOYED = "pruned_int8"


# ---------------------------------------------------------------- ingest

def ingest(rundir: Path, sources: List[str], cfg: Config, progress: Progress = None) -> Dict[str, Any]:
    from trainer.evaluate import gate_resolution_warning
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
    atomic.write_json(rundir / "config.json", to_dict(cfg))
    ds.save(rundir / "ingest" / "dataset.npz")
    atomic.write_json(rundir / "ingest" / "cleaning.json", report)
    atomic.write_json(rundir / "ingest" / "split.json", {"train": train_idx.tolist(), "test": test_idx.tolist()})
    write_lineage(rundir, "ingest", cfg, [], [rundir / "ingest" / "dataset.npz", rundir / "ingest" / "split.json"])
    return report


# ---------------------------------------------------------------- train

def train(rundir: Path, progress: Progress = None) -> Dict[str, Any]:
    from trainer.models import check_weights
    from trainer.train import cross_validate, epoch_bar, fit, metrics, predict_float, total_epochs

    cfg = run_config(rundir)
    check_lineage(rundir, "ingest", cfg)
    check_weights(cfg.model)
    ds, tr, te = load_data(rundir)
    n = len(ds.class_names)
    cv = cross_validate(ds.images[tr], ds.labels[tr], ds.groups[tr], n, cfg, progress)
    out = rundir / "train"
    atomic.write_json(out / "cv.json", cv)
    callbacks = [epoch_bar(progress, total_epochs(cfg, cfg.train.epochs))] if progress is not None else []
    model, history = fit(ds.images[tr], ds.labels[tr], n, cfg, cfg.train.epochs,
                         val=(ds.images[te], ds.labels[te]), seed=cfg.data.seed, callbacks=callbacks)
    m = metrics(ds.labels[te], predict_float(model, ds.images[te], cfg).argmax(1), n)
    save_keras(model, out / "float.h5")
    save_saved_model(model, out / "saved_model", base_spec(cfg), ds.class_names)
    atomic.write_json(out / "input_spec.json", input_contract(base_spec(cfg), ds.class_names))
    atomic.write_json(out / "history.json", history)
    atomic.write_json(out / "metrics.json", {"test": m, "class_names": ds.class_names})
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

    atomic.write_bytes(out / "float.tflite", opt.to_tflite(model))
    step("float")
    oc = cfg.optimize
    atomic.write_bytes(out / "int8.tflite", opt.to_tflite(model, rep, oc.io_dtype, oc.per_channel))
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
    atomic.write_bytes(out / "pruned_float.tflite", opt.to_tflite(pruned))
    step("prune")
    final = pruned
    if cfg.optimize.qat:
        final = opt.prune_preserving_qat(pruned, ds.images[tr], ds.labels[tr], cfg)
        step("qat")
    atomic.write_bytes(out / "pruned_int8.tflite", opt.to_tflite(final, rep, oc.io_dtype, oc.per_channel))
    step("pruned_int8")
    if bar is not None:
        bar.close()
    atomic.write_json(out / "optimize.json", info)
    write_lineage(rundir, "optimize", cfg,
                  [rundir / "train" / "float.h5", rundir / "ingest" / "dataset.npz", rundir / "ingest" / "split.json"],
                  [out / f"{name}.tflite" for name in STAGES] + [out / "pruned.h5"])
    return info


# ---------------------------------------------------------------- evaluate

def evaluate(rundir: Path, progress: Progress = None) -> Dict[str, Any]:
    """Every .tflite on the held-out split through the edge runtime; the gate; the self-test cases.

    Each model's bytes are read once: the accuracy, the input spec, the self-test scores and the sha256
    recorded for `package` all describe those same bytes."""
    from trainer import calibration, threshold
    from trainer import evaluate as ev
    from trainer.optimize import gzip_size
    from trainer.train import metrics

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
    scores: Dict[str, Any] = {}
    it = STAGES if progress is None else progress(STAGES, desc="evaluate", unit="model")
    for name in it:
        data = models[name]
        spec = ev.spec_of(data, base)
        scores[name] = ev.run_tflite(data, spec, ds.images[te])
        m = metrics(ds.labels[te], scores[name].argmax(1), n)
        result["stages"][name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "confusion": m["confusion"],
                                  "per_class": m["per_class"], "bytes": len(data), "gzip_bytes": gzip_size(data),
                                  "latency": ev.latency_ms(data, spec, ds.images[te], runs=30),
                                  "spec": spec.to_dict(), "sha256": hashlib.sha256(data).hexdigest()}
    result["machine"] = ev.machine()
    g = ev.gate(result["stages"]["float"]["accuracy"], result["stages"][DEPLOYED]["accuracy"],
                cfg.gate.max_accuracy_drop)
    g["n_test"] = int(len(te))
    g["points_per_test_image"] = 100.0 / max(1, len(te))
    warn = ev.gate_resolution_warning(len(te), cfg.gate.max_accuracy_drop)
    if warn:
        result["warnings"].append(warn)
    # the device's sampling rules swept over the deployed model's held-out scores (trainer/threshold.py)
    result["threshold"] = threshold.analyse(scores[DEPLOYED], ds.labels[te], cfg.gate.errors_to_catch)
    result["warnings"].extend(result["threshold"]["warnings"])
    result["calibration"] = {"int8": calibration.reliability(scores[DEPLOYED], ds.labels[te]),
                             "float": calibration.reliability(scores["float"], ds.labels[te])}
    result["mistakes"] = ev.mistakes(scores[DEPLOYED], ds.labels[te], te)
    result["gate"] = g
    spec = InputSpec.from_dict(result["stages"][DEPLOYED]["spec"])
    result["deployed"] = {"file": f"optimize/{DEPLOYED}.tflite", "sha256": result["stages"][DEPLOYED]["sha256"]}
    # No latency budget by default: a desktop's timing says nothing about a Jetson's; the device applies
    # its own update.self_test_latency_ms (and the smaller of the two when the bundle sets one).
    result["self_test"] = {"cases": ev.self_test_cases(models[DEPLOYED], spec, ds.images[te], ds.labels[te],
                                                       cfg.gate.self_test_cases),
                           "tolerance": cfg.gate.self_test_tolerance,
                           "latency_budget_ms": cfg.gate.latency_budget_ms or None}
    atomic.write_json(rundir / "evaluate" / "evaluate.json", result)
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
    from proto import bundle, keys
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
    if "threshold" not in ev:
        raise RunDirError(f"{rundir / 'evaluate' / 'evaluate.json'} has no sampling-threshold sweep (evaluated "
                          f"by an older trainer): run `kestrel-train evaluate {rundir}` again")
    chosen = resolve_threshold(ev["threshold"], cfg.gate.default_threshold)
    op = read_json(rundir / "optimize" / "optimize.json", "optimize")
    metrics = bundle_metrics(ev, cv, len(model_bytes), chosen, op)
    data = bundle.build_bundle(
        model_bytes=model_bytes, labels=ev["class_names"], model_name=cfg.gate.model_name, version=int(version),
        input_spec=spec, signing_key=signing_key, default_threshold=chosen["threshold"],
        metrics=metrics, self_test=ev["self_test"], expires_in_s=int(cfg.gate.expires_in_days * 86400))
    atomic.write_bytes(Path(out), data)
    return {"bundle": str(out), "bytes": len(data), "version": int(version), "metrics": metrics,
            "default_threshold": chosen["threshold"], "threshold_source": chosen["source"]}


MAX_CONFUSION_CLASSES = 200  # the manifest carries the confusion matrix up to this many classes (40k cells)


def resolve_threshold(sweep: Dict[str, Any], configured: Optional[float]) -> Dict[str, Any]:
    from trainer.threshold import resolve

    return resolve(sweep, configured)


def bundle_metrics(ev: Dict[str, Any], cv: Dict[str, Any], model_bytes: int, chosen: Dict[str, Any],
                   op: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The signed manifest's metrics: accuracy figures, the confusion matrix with its class names (the hub
    dashboard renders it), calibration and what the default threshold sends and catches on held-out."""
    st = ev["stages"]
    metrics: Dict[str, Any] = {
        "accuracy": st[DEPLOYED]["accuracy"], "macro_f1": st[DEPLOYED]["macro_f1"],
        "float_accuracy": st["float"]["accuracy"], "accuracy_drop_points": ev["gate"]["drop_points"],
        "cv_accuracy_mean": (cv.get("accuracy") or {}).get("mean"),
        "cv_accuracy_std": (cv.get("accuracy") or {}).get("std"),
        "cv_k": cv.get("k"), "bytes": model_bytes, "n_test": ev.get("n_test"),
        # for the hub dashboard's Models page: the int8 model's median latency on the trainer's machine
        # (edge runtime) and the share of zero weights in its pruned kernels (optimize.json)
        "latency_ms": (st[DEPLOYED].get("latency") or {}).get("median_ms"),
        "sparsity": ((op or {}).get("sparsity") or {}).get("overall"),
        "ece": ((ev.get("calibration") or {}).get("int8") or {}).get("ece"),
        "ece_float": ((ev.get("calibration") or {}).get("float") or {}).get("ece"),
        "sampling": {"threshold": chosen["threshold"], "source": chosen["source"],
                     "errors_to_catch": chosen["target"], "sent_share": chosen["sent_share"],
                     "caught_share": chosen["caught_share"], "n_errors": chosen["n_errors"],
                     "expected_caught_share": chosen["expected"]["caught_share"]},
    }
    if len(ev["class_names"]) <= MAX_CONFUSION_CLASSES:
        metrics["class_names"] = list(ev["class_names"])
        metrics["confusion_matrix"] = st[DEPLOYED]["confusion"]
    return {k: v for k, v in metrics.items() if v is not None}
