"""Every architecture through pruning and full-integer conversion (tiny: 32 px, alpha 0.35, one pruning
step), transfer learning from a local weights file, and every converted model (each architecture, both
io dtypes, QAT, per-tensor weights) on the oldest device runtime: the
tflite-runtime a Jetson Nano gets (jetson/constraints-jp46.txt) under Python 3.8."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from edge.inference.runtime import load_model
from tests.trainer.conftest import DEVICE_TFLITE_RUNTIME, PY38, need_py38
from trainer import models
from trainer import optimize as opt
from trainer.config import Config, apply_overrides
from trainer.tfenv import tf

# (arch, io dtype): every architecture and both io dtypes; MobileNetV3 cases with int8 and uint8 I/O.
CASES = [("small_cnn", "int8"), ("mobilenet_v2", "uint8"), ("mobilenet_v3_small", "int8"),
         ("mobilenet_v3_large", "uint8")]
N_CLASSES = 3

PY38_SCRIPT = r"""
import json, sys
import numpy as np
import tflite_runtime
from tflite_runtime.interpreter import Interpreter
report = {"version": tflite_runtime.__version__, "models": {}}
for name, case in json.load(open(sys.argv[1])).items():
    it = Interpreter(model_path=case["path"], num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    worst = 0
    for x, want in zip(case["inputs"], case["outputs"]):
        it.set_tensor(inp["index"], np.array(x, dtype=inp["dtype"]).reshape(inp["shape"]))
        it.invoke()
        got = it.get_tensor(out["index"]).reshape(-1).astype(np.int64)
        worst = max(worst, int(np.abs(got - np.array(want, np.int64)).max()))
    report["models"][name] = {"worst_quanta": worst, "in": np.dtype(inp["dtype"]).name,
                              "out_scale": float(out["quantization"][0])}
print(json.dumps(report))
"""


def _data(n: int = 8, size: int = 32) -> tuple:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8), np.arange(n) % N_CLASSES


def _cfg(arch: str, io: str, **extra: object) -> Config:
    return apply_overrides(Config(), {"model.arch": arch, "model.input_size": 32, "train.batch_size": 8,
                                      "optimize.prune_epochs": 1, "optimize.io_dtype": io,
                                      "optimize.representative_samples": 4, **extra})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):  # noqa: ANN001, ANN201
    """name -> {path, sparsity, io, inputs, outputs (raw quantized, from ai-edge-litert)}."""
    from ai_edge_litert.interpreter import Interpreter

    from trainer.preprocess import model_input

    out = tmp_path_factory.mktemp("convert")
    x, y = _data()
    res = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "RUN_EAGERLY", True)        # one step on a tiny model: skip graph tracing
        mp.setattr(opt, "MIN_PRUNE_STEPS", 1)
        extra = [("small_cnn", "uint8", {"optimize.qat": True, "optimize.qat_epochs": 1}),
                 ("small_cnn", "int8", {"optimize.per_channel": False})]
        for arch, io, more in [(a, i, {}) for a, i in CASES] + extra:
            cfg = _cfg(arch, io, **more)
            model = models.build_model(cfg.model, N_CLASSES, seed=0)
            pruned, _info, _hist = opt.prune(model, x, y, cfg)
            final = opt.prune_preserving_qat(pruned, x, y, cfg) if cfg.optimize.qat else pruned
            name = f"{arch}-{io}" + ("-qat" if cfg.optimize.qat else "") + ("" if cfg.optimize.per_channel
                                                                             else "-per_tensor")
            data = opt.to_tflite(final, opt.representative(x, cfg, 4), io, cfg.optimize.per_channel)
            path = out / f"{name}.tflite"
            path.write_bytes(data)
            spec = load_model(data).spec
            inputs = [model_input(p, spec) for p in x[:3]]
            it = Interpreter(model_content=data, num_threads=1)   # raw quantized outputs: compare runtimes exactly
            it.allocate_tensors()
            outputs = []
            for t in inputs:
                it.set_tensor(it.get_input_details()[0]["index"], t)
                it.invoke()
                outputs.append(it.get_tensor(it.get_output_details()[0]["index"]).reshape(-1).astype(int).tolist())
            res[name] = {"path": str(path), "bytes": len(data), "sparsity": opt.sparsity_of(pruned)["overall"],
                         "io": io, "spec": spec, "inputs": [t.reshape(-1).astype(int).tolist() for t in inputs],
                         "outputs": outputs, "tensors": opt.tensor_types(data)}
            tf().keras.backend.clear_session()
    return res


@pytest.mark.slow
def test_every_architecture_prunes_and_converts_to_full_integer(converted):
    assert sorted(converted) == sorted([f"{a}-{io}" for a, io in CASES]
                                       + ["small_cnn-uint8-qat", "small_cnn-int8-per_tensor"])
    # Per-tensor weight scales drop ~12 bytes of quantization parameters per output channel.
    channels = 16 + 32 + 64 + 128 + N_CLASSES
    assert converted["small_cnn-int8-per_tensor"]["bytes"] <= converted["small_cnn-int8"]["bytes"] - 10 * channels
    for name, c in converted.items():
        assert c["sparsity"] > 0.3, (name, c["sparsity"])            # pruning really ran on every arch
        assert c["spec"].dtype == c["io"] and c["spec"].scale > 0, name
        assert c["tensors"].get("float32", 0) == 0, (name, c["tensors"])


@pytest.mark.slow
def test_converted_models_run_on_the_device_tflite_runtime(converted, tmp_path):
    need_py38()
    doc = {n: {"path": c["path"], "inputs": c["inputs"], "outputs": c["outputs"]} for n, c in converted.items()}
    (tmp_path / "cases.json").write_text(json.dumps(doc))
    (tmp_path / "check.py").write_text(PY38_SCRIPT)
    proc = subprocess.run([str(PY38), str(tmp_path / "check.py"), str(tmp_path / "cases.json")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["version"] == DEVICE_TFLITE_RUNTIME
    assert set(rep["models"]) == set(converted)
    for name, r in rep["models"].items():
        assert r["in"] == converted[name]["io"]
        # The device's self-test would pass: scores within the bundle's default tolerance (a step or two).
        assert r["worst_quanta"] * r["out_scale"] <= Config().gate.self_test_tolerance, (name, r)


def test_device_venv_counts_only_once_make_finished_it(tmp_path, monkeypatch):
    """A bare .venv38/bin/python (make stopped before the installs) is no device venv: the Makefile's .stamp is."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    monkeypatch.delenv("KESTREL_REQUIRE_PY38", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"\.stamp is absent"):
        need_py38(tmp_path)
    monkeypatch.setenv("KESTREL_REQUIRE_PY38", "1")
    with pytest.raises(pytest.fail.Exception, match="KESTREL_REQUIRE_PY38=1"):
        need_py38(tmp_path)
    (tmp_path / ".stamp").touch()
    assert need_py38(tmp_path) is True


def test_qat_on_mobilenet_v3_is_refused_at_config_time():
    from proto.errors import ConfigError

    with pytest.raises(ConfigError, match="optimize.qat does not support mobilenet_v3_small"):
        _cfg("mobilenet_v3_small", "uint8", **{"optimize.qat": True})


@pytest.mark.slow
def test_transfer_learning_trains_the_head_on_the_frozen_backbone_then_fine_tunes(tmp_path, monkeypatch):
    """The path with a local ImageNet-style weights file (made here from a random MobileNetV2: no download)."""
    from trainer.train import fit

    monkeypatch.setattr(models, "RUN_EAGERLY", True)
    keras = tf().keras
    backbone = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False,
                                              weights=None, pooling="avg")
    rng = np.random.default_rng(1)
    bn = backbone.get_layer("bn_Conv1")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, beta, rng.normal(size=mean.shape).astype("float32"), var + 0.5])  # not a fresh init
    path = tmp_path / "mobilenet_v2_0.35_32_no_top.h5"
    backbone.save_weights(str(path))
    ref = {n: [w.copy() for w in backbone.get_layer(n).get_weights()] for n in ("Conv1", "bn_Conv1")}
    keras.backend.clear_session()

    snaps = {}

    class Snap(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch, logs=None):  # noqa: ANN001, ANN201
            snaps[epoch] = {n: [w.copy() for w in self.model.get_layer(n).get_weights()]
                            for n in ("Conv1", "bn_Conv1", "scores")}
            snaps[epoch]["lr"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))

    x, y = _data(16)
    cfg = apply_overrides(Config(), {"model.arch": "mobilenet_v2", "model.input_size": 32, "model.alpha": 0.35,
                                     "model.weights": str(path), "model.normalization": "-1_1",
                                     "train.head_epochs": 1, "train.epochs": 1, "train.batch_size": 8,
                                     "train.learning_rate": 0.01, "train.augment": False})
    _model, hist = fit(x, y, N_CLASSES, cfg, cfg.train.epochs, callbacks=[Snap()])
    assert hist["phase"] == [0.0, 1.0] and len(hist["loss"]) == 2
    # Phase 0 (head only): the backbone is exactly the file's, its BatchNorm statistics untouched.
    for a, b in zip(snaps[0]["Conv1"] + snaps[0]["bn_Conv1"], ref["Conv1"] + ref["bn_Conv1"]):
        np.testing.assert_array_equal(a, b)
    assert snaps[0]["lr"] == pytest.approx(0.01)
    # Phase 1 (fine-tune at lr x 0.1): the convolutions move, BatchNorm keeps its ImageNet statistics.
    assert not np.array_equal(snaps[1]["Conv1"][0], ref["Conv1"][0])
    for a, b in zip(snaps[1]["bn_Conv1"], ref["bn_Conv1"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(snaps[1]["scores"][0], snaps[0]["scores"][0])
    assert snaps[1]["lr"] == pytest.approx(0.001)


@pytest.mark.slow
def test_int8_io_model_goes_through_evaluation_and_the_device_self_test(converted):
    """io_dtype = int8: signed inputs with a zero point, through the trainer's evaluation helpers and the
    device's self-test (what a bundle of such a model would replay)."""
    from pathlib import Path

    from edge.updater.selftest import run_self_test
    from trainer.evaluate import evaluate_tflite, self_test_cases

    c = converted["small_cnn-int8"]
    data = Path(c["path"]).read_bytes()
    assert c["spec"].dtype == "int8" and -128 <= c["spec"].zero_point <= 127
    x, y = _data()
    m = evaluate_tflite(data, c["spec"], x, y, N_CLASSES)
    assert sum(map(sum, m["confusion"])) == len(y)
    cases = self_test_cases(data, c["spec"], x, y, 4)
    assert len(cases) == 4
    res = run_self_test(load_model(data, spec=c["spec"]), {"cases": cases, "tolerance": 1e-6,
                                                           "latency_budget_ms": None}, latency_budget_ms=1000.0)
    assert res["cases"] == 4 and res["max_diff"] == 0.0
