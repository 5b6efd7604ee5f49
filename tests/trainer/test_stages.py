"""Stages on the one shared tiny run (tests/trainer/conftest.py): CV, pruning, int8 conversion, edge-runtime
evaluation, the gate, the report, the stage subcommands, lineage (package signs only what was evaluated)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from edge.inference.runtime import load_model
from proto.inputspec import InputSpec
from tests.trainer.conftest import CLASSES, TEST_FRACTION, tiny_config
from trainer import pipeline
from trainer.cli import main
from trainer.errors import GateError, RunDirError, WeightsError
from trainer.rundir import INPUT_CONTRACT


def _json(p):  # noqa: ANN001, ANN202
    return json.loads(p.read_text())


def _held_out(rundir):  # noqa: ANN001, ANN202
    from trainer.ingest import Dataset

    ds = Dataset.load(rundir / "ingest" / "dataset.npz")
    te = np.array(_json(rundir / "ingest" / "split.json")["test"])
    return ds.images[te], ds.labels[te]


def _cli(capsys, *argv):  # noqa: ANN001, ANN002, ANN202
    rc = main([*argv, "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def test_cross_validation_folds_partition_the_training_split(trained_run):
    cv = _json(trained_run / "train" / "cv.json")
    split = _json(trained_run / "ingest" / "split.json")
    assert cv["k"] == 2 and len(cv["folds"]) == 2
    # Each fold validates on a disjoint part of the training split; together they cover all of it.
    assert sum(f["val"] for f in cv["folds"]) == len(split["train"])
    assert all(f["train"] + f["val"] == len(split["train"]) for f in cv["folds"])
    # Every fold learned well beyond chance (1/10) in 5 epochs on ~105 images of 10 digits (BatchNorm statistics
    # that lag the weights used to leave the exported, inference-mode model near chance: trainer.train.bn_momentum).
    assert min(f["accuracy"] for f in cv["folds"]) > 3.0 / CLASSES


def test_test_split_is_the_requested_fraction_per_class(trained_run):
    split = _json(trained_run / "ingest" / "split.json")
    labels = np.load(trained_run / "ingest" / "dataset.npz")["labels"]
    for c in range(CLASSES):
        n_c = int((labels == c).sum())
        n_test = int((labels[split["test"]] == c).sum())
        assert abs(n_test - TEST_FRACTION * n_c) <= 1, (c, n_test, n_c)


def test_pruning_reaches_target_sparsity(trained_run):
    op = _json(trained_run / "optimize" / "optimize.json")
    target = tiny_config().optimize.sparsity
    assert op["sparsity"]["overall"] == pytest.approx(target, abs=0.02)
    assert op["schedule"]["final_sparsity"] == target
    assert op["converter"]["experimental_new_quantizer"] is True and op["converter"]["tensorflow"]
    from trainer.optimize import gzip_size

    pruned = (trained_run / "optimize" / "pruned_int8.tflite").read_bytes()
    plain = (trained_run / "optimize" / "int8.tflite").read_bytes()
    assert gzip_size(pruned) < 0.85 * gzip_size(plain)


def test_int8_model_is_full_integer(trained_run):
    from trainer.optimize import tensor_types

    data = (trained_run / "optimize" / "pruned_int8.tflite").read_bytes()
    m = load_model(data)
    assert m.spec.dtype == "uint8" and m.spec.scale > 0
    types = tensor_types(data)
    assert types.get("int8", 0) > 5
    # Only the bias vectors are int32; no float tensors are left in a full-integer model.
    assert types.get("float32", 0) == 0, types


def test_evaluation_on_edge_runtime_reproduces_and_the_gate_passes(trained_run):
    ev = _json(trained_run / "evaluate" / "evaluate.json")
    st = ev["stages"]
    assert set(st) == {"float", "pruned_float", "int8", "pruned_int8"}
    assert st["float"]["accuracy"] >= 0.8                       # 4 digits: clearly learned (chance: 0.25)
    assert st["int8"]["bytes"] < 0.35 * st["float"]["bytes"]
    assert st["pruned_int8"]["latency"]["runtime"] in ("ai-edge-litert", "tflite-runtime")
    assert ev["gate"]["passed"] is True and ev["gate"]["max_drop_points"] == 10.0
    assert ev["gate"]["n_test"] == ev["n_test"] == len(_json(trained_run / "ingest" / "split.json")["test"])
    assert len(ev["self_test"]["cases"]) == tiny_config().gate.self_test_cases
    assert ev["self_test"]["latency_budget_ms"] is None
    # Independently: the deployed file on the edge runtime, against the TRUE held-out labels.
    from trainer.evaluate import evaluate_tflite

    images, labels = _held_out(trained_run)
    data = (trained_run / "optimize" / "pruned_int8.tflite").read_bytes()
    m = evaluate_tflite(data, InputSpec.from_dict(st["pruned_int8"]["spec"]), images, labels, CLASSES)
    assert m["accuracy"] == st["pruned_int8"]["accuracy"]
    import hashlib

    assert ev["deployed"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_package_signs_only_the_evaluated_model(run_copy, tmp_path, capsys):
    from proto.keys import generate_keypair

    key, _pub = generate_keypair(tmp_path / "keys")
    bundle = tmp_path / "b.kbundle"
    opt = run_copy / "optimize"
    original = (opt / "pruned_int8.tflite").read_bytes()
    # A different (valid) model where the evaluated one was, e.g. after re-running optimize alone.
    (opt / "pruned_int8.tflite").write_bytes((opt / "int8.tflite").read_bytes())
    with pytest.raises(RunDirError, match="pruned_int8.tflite changed after `evaluate` ran"):
        pipeline.package(run_copy, str(key), 1, bundle)
    (opt / "pruned_int8.tflite").write_bytes(original)
    # A config change that affects the evaluated model (or the gate) needs a new evaluate ...
    cfg = _json(run_copy / "config.json")
    cfg["optimize"]["sparsity"] = 0.8
    (run_copy / "config.json").write_text(json.dumps(cfg))
    rc, _out, err = _cli(capsys, "package", str(run_copy), "--key", str(key), "--version", "1", "--out", str(bundle))
    assert rc == 2 and "config.json changed after `evaluate` ran" in err[-1] and not bundle.exists()
    # ... and so does optimize (it builds on train, whose config did not change, so that part is fine).
    with pytest.raises(RunDirError, match="config.json changed after `optimize` ran"):
        pipeline.evaluate(run_copy)
    # Packaging-only fields (name, threshold, expiry) may change after evaluate.
    cfg["optimize"]["sparsity"] = 0.5
    cfg["gate"].update(model_name="renamed", default_threshold=0.7)
    (run_copy / "config.json").write_text(json.dumps(cfg))
    rc, _out, err = _cli(capsys, "package", str(run_copy), "--key", str(key), "--version", "1", "--out", str(bundle))
    assert rc == 0, err
    from proto.bundle import read_manifest_unverified

    man = read_manifest_unverified(bundle.read_bytes())
    assert man.model_name == "renamed" and man.default_threshold == 0.7
    assert man.metrics["sampling"]["source"] == "config"                # the configured threshold wins
    # Bundle versions start at 1.
    rc, _out, err = _cli(capsys, "package", str(run_copy), "--key", str(key), "--version", "0", "--out", str(bundle))
    assert rc == 2 and "version must be an integer >= 1" in err[-1]


def test_stale_training_is_refused_by_later_stages(run_copy):
    (run_copy / "ingest" / "split.json").write_text(
        json.dumps({**_json(run_copy / "ingest" / "split.json"), "extra": 1}))
    with pytest.raises(RunDirError, match="split.json changed after `ingest` ran"):
        pipeline.train(run_copy)
    with pytest.raises(RunDirError, match="split.json changed after `train` ran"):
        pipeline.optimize(run_copy)
    (run_copy / "optimize" / "lineage.json").unlink()
    with pytest.raises(RunDirError, match="`optimize` has not finished"):
        pipeline.evaluate(run_copy)


def test_report_files_and_figures(trained_run):
    import re

    rep = trained_run / "report"
    figs = _json(rep / "figures.json")
    assert set(figs) == {"learning_curves", "fold_accuracy", "confusion_matrix", "per_class", "size", "latency",
                         "threshold", "calibration"}
    assert figs["fold_accuracy"]["fold"] == [1, 2]                                    # folds counted from 1
    assert figs["size"]["models"] == ["float", "pruned (float)", "int8", "pruned int8 (deployed)"]
    ev = _json(trained_run / "evaluate" / "evaluate.json")
    assert figs["size"]["gzip_bytes"] == [ev["stages"][k]["gzip_bytes"] for k in
                                          ("float", "pruned_float", "int8", "pruned_int8")]
    assert "ai-edge-litert" in figs["latency"]["runtime"] and figs["latency"]["machine"]
    n_test = len(_json(trained_run / "ingest" / "split.json")["test"])
    assert np.array(figs["confusion_matrix"]["matrix"]).sum() == n_test
    assert sum(figs["per_class"]["support"]) == n_test
    assert set(figs["calibration"]) == {"int8", "float"}
    html = (rep / "report.html").read_text()
    for name in ("learning_curves", "fold_accuracy", "size", "latency", "threshold", "calibration"):
        assert (rep / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one self-contained file: every image inline, nothing fetched from anywhere
    srcs = re.findall(r"<img[^>]*\ssrc='([^']*)'", html)
    assert len(srcs) >= 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(href|src)=['\"](?!data:)", html) and "<link" not in html and "<script" not in html
    g = ev["gate"]
    drop = g["drop_points"]
    words = ("exactly as accurate as float" if abs(drop) < 1e-9 else
             f"{abs(drop):.1f} points {'better' if drop < 0 else 'worse'} than float")
    assert f"int8 is {words}" in html and "Gate passed" in html
    assert "PolynomialDecay" in html and "Nothing dropped" in html and "{'" not in html  # no Python dicts
    assert f"Misclassified held-out images ({len(ev['mistakes'])})" in html
    assert "ECE" in html and "Sampling threshold" in html and "Uplink volume" in html


def test_run_dir_files_are_atomic_and_world_readable(cli_run):
    from proto.atomic import is_temp

    files = [p for p in cli_run.rundir.rglob("*") if p.is_file()] + [cli_run.bundle]
    assert not [p for p in files if is_temp(p.name)]                     # no temp leftovers
    for p in (cli_run.bundle, cli_run.rundir / "report" / "report.html",
              cli_run.rundir / "report" / "size.png", cli_run.rundir / "evaluate" / "evaluate.json"):
        assert stat.S_IMODE(os.stat(p).st_mode) & 0o044 == 0o044, p   # not 0600 like mkstemp's files


def test_saved_model_carries_its_input_contract(trained_run):
    doc = _json(trained_run / "train" / "saved_model" / INPUT_CONTRACT)
    assert doc == _json(trained_run / "train" / "input_spec.json")
    spec = InputSpec.from_dict(doc["input"])
    assert spec.dtype == "float32" and spec.shape == [1, 32, 32, 3] and spec.normalization == "0_1"
    assert doc["labels"] == [str(c) for c in range(CLASSES)]
    from trainer.tfenv import tf

    loaded = tf().saved_model.load(str(trained_run / "train" / "saved_model"))
    images, labels = _held_out(trained_run)
    from trainer.preprocess import normalize

    scores = loaded.signatures["serving_default"](image=tf().constant(normalize(images[:8], "0_1")))
    pred = np.argmax(next(iter(scores.values())).numpy(), axis=1)
    assert (pred == labels[:8]).mean() >= 0.75                          # the contract is the right one


def test_wrong_weights_file_is_refused_before_training(tmp_path):
    from trainer.config import ModelConfig
    from trainer.models import check_weights
    from trainer.tfenv import tf

    keras = tf().keras
    wrong = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, include_top=False,
                                                weights=None, include_preprocessing=False)
    path = tmp_path / "v3.h5"
    wrong.save_weights(str(path))
    cfg = ModelConfig(arch="mobilenet_v2", input_size=32, alpha=0.35, weights=str(path), normalization="-1_1")
    with pytest.raises(WeightsError, match="does not fit mobilenet_v2"):
        check_weights(cfg)
    with pytest.raises(WeightsError, match="does not exist"):
        check_weights(ModelConfig(arch="mobilenet_v2", input_size=32, weights=str(tmp_path / "none.h5")))
    # The matching file loads.
    ok = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None,
                                        pooling="avg")
    ok.save_weights(str(tmp_path / "v2.h5"))
    check_weights(ModelConfig(arch="mobilenet_v2", input_size=32, alpha=0.35, weights=str(tmp_path / "v2.h5")))


def test_pruning_preserving_qat_through_the_cli_keeps_sparsity_and_accuracy(run_copy, capsys):
    from trainer.optimize import gzip_size, tensor_types

    cfg = _json(run_copy / "config.json")
    cfg["optimize"].update(qat=True, qat_epochs=1)
    (run_copy / "config.json").write_text(json.dumps(cfg))
    rc, _out, err = _cli(capsys, "optimize", str(run_copy))
    assert rc == 0, err
    assert _json(run_copy / "optimize" / "optimize.json")["qat"] is True
    qat = (run_copy / "optimize" / "pruned_int8.tflite").read_bytes()
    assert tensor_types(qat).get("float32", 0) == 0
    assert load_model(qat).spec.dtype == "uint8"
    # The zeros survive QAT: the pruned+QAT int8 model compresses like a pruned one.
    plain = (run_copy / "optimize" / "int8.tflite").read_bytes()
    assert gzip_size(qat) < 0.85 * gzip_size(plain)
    # ... and it still classifies: evaluate (the subcommand) on the held-out split.
    rc, out, err = _cli(capsys, "evaluate", str(run_copy))
    assert rc == 0 and "gate passed" in out, err
    ev = _json(run_copy / "evaluate" / "evaluate.json")
    assert ev["stages"]["pruned_int8"]["accuracy"] >= 0.8


def test_broken_quantization_is_refused_by_run_evaluate_package_and_report(digits_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """The whole `run` with a deliberately broken quantization: a representative data set of constant zeros
    calibrates every range to ~0, so int8 accuracy collapses. `run` exits 2 with the report written and no
    bundle; then `evaluate`, `package` and the report on that run dir refuse or show it too. (One run for all:
    a second training would only repeat the refusal.)"""
    from proto.keys import generate_keypair
    from trainer import optimize as opt

    def zeros_rep(images, cfg, n):  # noqa: ANN001, ANN202, ARG001
        def gen():  # noqa: ANN202
            for _ in range(10):
                yield [np.zeros((1, 32, 32, 3), np.float32)]
        return gen

    monkeypatch.setattr(opt, "representative", zeros_rep)
    key, _ = generate_keypair(tmp_path / "keys")
    rundir = tmp_path / "r"
    rc, out, err = _cli(capsys, "run", "--data", str(digits_dir), "--out", str(rundir), "--folds", "0",
                        "--epochs", "5", "--sparsity", "0", "--no-flip", "--key", str(key), "--version", "1")
    assert rc == 2 and "evaluation gate failed" in err[-1] and "packaging refused" in err[-1]
    html = (rundir / "report" / "report.html").read_text()
    assert "report:" in out and "Gate refused" in html and "points worse than float" in html
    assert not list(rundir.glob("*.kbundle"))
    assert _json(rundir / "config.json")["gate"]["max_accuracy_drop"] == 1.0
    assert _json(rundir / "evaluate" / "evaluate.json")["gate"]["drop_points"] > 10

    rc, out, err = _cli(capsys, "evaluate", str(rundir))
    assert rc == 2 and "gate FAILED" in out and "evaluation gate failed" in err[-1]
    bundle = tmp_path / "b.kbundle"
    rc, _out, err = _cli(capsys, "package", str(rundir), "--key", str(key), "--version", "1", "--out", str(bundle))
    assert rc == 2 and len(err) == 1 and "packaging refused" in err[0]
    assert not bundle.exists()
    with pytest.raises(GateError, match="evaluation gate failed: int8 accuracy .* points below"):
        pipeline.package(rundir, str(key), 1, bundle)
    rc, _out, _err = _cli(capsys, "report", str(rundir))
    assert rc == 0 and "Gate refused" in (rundir / "report" / "report.html").read_text()


def test_training_is_reproducible_from_the_seed():
    """[train] deterministic (the default): two trainings on the same data and seed give the same weights, bit
    for bit (without TensorFlow's op determinism the demo's float accuracy moved 87-96 % between runs)."""
    from trainer.train import fit

    rng = np.random.default_rng(3)
    cfg = tiny_config()
    size = cfg.model.input_size
    images = rng.integers(0, 256, (64, size, size, cfg.model.channels), dtype=np.uint8)
    labels = np.arange(64) % CLASSES
    assert cfg.train.deterministic
    a, _ = fit(images, labels, CLASSES, cfg, epochs=1, seed=5)
    b, _ = fit(images, labels, CLASSES, cfg, epochs=1, seed=5)
    c, _ = fit(images, labels, CLASSES, cfg, epochs=1, seed=6)
    wa, wb, wc = a.get_weights(), b.get_weights(), c.get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert not all(np.array_equal(x, y) for x, y in zip(wa, wc))  # the check can tell models apart
