"""Stages on one shared tiny trained run: CV, pruning, int8 conversion, edge-runtime evaluation, gate, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge.runtime import load_model
from tests.trainer.conftest import CLASSES, tiny_config
from trainer import pipeline
from trainer.errors import GateError, WeightsError


def _json(p):  # noqa: ANN001, ANN202
    return json.loads(p.read_text())


def test_cross_validation_reports_mean_and_std(trained_run):
    cv = _json(trained_run / "train" / "cv.json")
    assert cv["k"] == 2 and len(cv["folds"]) == 2
    accs = [f["accuracy"] for f in cv["folds"]]
    assert cv["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert cv["accuracy"]["std"] == pytest.approx(np.std(accs))
    assert 0 <= cv["macro_f1"]["mean"] <= 1
    assert (trained_run / "train" / "saved_model" / "saved_model.pb").is_file()


def test_pruning_reaches_target_sparsity(trained_run):
    op = _json(trained_run / "optimize" / "optimize.json")
    target = tiny_config().optimize.sparsity
    assert op["sparsity"]["overall"] == pytest.approx(target, abs=0.02)
    assert op["schedule"]["final_sparsity"] == target
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


def test_evaluation_uses_edge_runtime_and_gate_passes(trained_run):
    ev = _json(trained_run / "evaluate" / "evaluate.json")
    assert set(ev["stages"]) == {"float", "pruned_float", "int8", "pruned_int8"}
    st = ev["stages"]
    assert st["float"]["accuracy"] > 1.5 / CLASSES           # clearly learned something
    assert st["int8"]["bytes"] < 0.35 * st["float"]["bytes"]
    assert st["pruned_int8"]["latency"]["runtime"] in ("ai-edge-litert", "tflite-runtime")
    assert ev["gate"]["passed"] == (ev["gate"]["drop_points"] <= 10.0)
    assert ev["gate"]["drop_points"] == pytest.approx((st["float"]["accuracy"] - st["pruned_int8"]["accuracy"]) * 100)
    assert len(ev["self_test"]["cases"]) == tiny_config().gate.self_test_cases
    # Re-running the int8 model on the edge runtime reproduces the recorded test accuracy.
    from trainer.evaluate import evaluate_tflite
    from trainer.ingest import Dataset

    ds = Dataset.load(trained_run / "ingest" / "dataset.npz")
    te = np.array(_json(trained_run / "ingest" / "split.json")["test"])
    from edge.inputspec import InputSpec

    m = evaluate_tflite((trained_run / "optimize" / "pruned_int8.tflite").read_bytes(),
                        InputSpec.from_dict(st["pruned_int8"]["spec"]), ds.images[te], ds.labels[te], CLASSES)
    assert m["accuracy"] == st["pruned_int8"]["accuracy"]


def test_gate_refuses_broken_quantization(run_copy, tmp_path):
    """A representative data set of constant zeros calibrates every range to ~0: int8 accuracy collapses."""
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["gate"]["max_accuracy_drop"] = 1.0
    (run_copy / "config.json").write_text(json.dumps(cfg))

    def zeros():  # noqa: ANN202
        for _ in range(10):
            yield [np.zeros((1, 32, 32, 3), np.float32)]

    pipeline.optimize(run_copy, rep_override=zeros)
    ev = pipeline.evaluate(run_copy)
    assert ev["gate"]["passed"] is False
    assert ev["gate"]["drop_points"] > 10
    from edge.keys import generate_keypair

    key, _ = generate_keypair(tmp_path / "keys")
    out = tmp_path / "b.kbundle"
    with pytest.raises(GateError, match="evaluation gate failed: int8 accuracy .* points below"):
        pipeline.package(run_copy, str(key), 1, out)
    assert not out.exists()


def test_report_files_and_figures(trained_run):
    rep = trained_run / "report"
    figs = _json(rep / "figures.json")
    assert set(figs) == {"learning_curves", "fold_accuracy", "confusion_matrix", "size_latency"}
    assert figs["size_latency"]["stages"] == ["float", "pruned", "int8", "pruned+int8 gzip"]
    n_test = len(_json(trained_run / "ingest" / "split.json")["test"])
    assert np.array(figs["confusion_matrix"]["matrix"]).sum() == n_test
    html = (rep / "report.html").read_text()
    for name in figs:
        png = rep / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{name}.png" in html
    assert "PolynomialDecay" in html and "Dropped" in html


def test_wrong_weights_file_is_refused_before_training(tmp_path):
    from trainer.config import ModelConfig
    from trainer.models import check_weights
    from trainer.tfenv import tf

    keras = tf().keras
    wrong = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, include_top=False,
                                                weights=None, include_preprocessing=False)
    path = tmp_path / "v3.h5"
    wrong.save_weights(str(path))
    cfg = ModelConfig(arch="mobilenet_v2", input_size=32, alpha=0.35, weights=str(path))
    with pytest.raises(WeightsError, match="does not fit mobilenet_v2"):
        check_weights(cfg)
    with pytest.raises(WeightsError, match="does not exist"):
        check_weights(ModelConfig(arch="mobilenet_v2", input_size=32, weights=str(tmp_path / "none.h5")))
    # The matching file loads.
    ok = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None,
                                        pooling="avg")
    ok.save_weights(str(tmp_path / "v2.h5"))
    check_weights(ModelConfig(arch="mobilenet_v2", input_size=32, alpha=0.35, weights=str(tmp_path / "v2.h5")))


def test_pruning_preserving_qat_keeps_sparsity(run_copy):
    from trainer.optimize import gzip_size, tensor_types

    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["optimize"].update(qat=True, qat_epochs=1)
    (run_copy / "config.json").write_text(json.dumps(cfg))
    info = pipeline.optimize(run_copy)
    assert info["qat"] is True
    qat = (run_copy / "optimize" / "pruned_int8.tflite").read_bytes()
    assert tensor_types(qat).get("float32", 0) == 0
    assert load_model(qat).spec.dtype == "uint8"
    # The zeros survive QAT: the pruned+QAT int8 model compresses like a pruned one.
    plain = (run_copy / "optimize" / "int8.tflite").read_bytes()
    assert gzip_size(qat) < 0.85 * gzip_size(plain)
