"""Run-dir IO shared by the stages (trainer/pipeline.py) and the report: the resolved config, the lineage
records that chain the stages, the model files (Keras .h5, the float SavedModel with its input contract)
and the ingested data set.

Lineage: each stage finishes by writing ``STAGE/lineage.json`` with the sha256 of the files it read and
wrote and a hash of the config sections it depends on (:data:`STAGE_CONFIG`). The next stage (and
``package``) first checks that record against the disk and the current config (:func:`check_lineage`).

Every file is written with proto.atomic (temp file in the same directory, fsync, rename, directory
fsync; mode 0644) or, for the .h5 and the SavedModel, the same steps by hand: a crash leaves the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from proto import atomic
from proto.inputspec import InputSpec
from proto.tomlconf import from_dict, to_dict
from trainer.config import Config
from trainer.errors import RunDirError

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
    atomic.write_json(rundir / stage / "lineage.json", {
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


# ---------------------------------------------------------------- model files

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
        atomic.write_json(tmp / INPUT_CONTRACT, input_contract(spec, labels))
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
                   "(proto/inputspec.py)"}


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
