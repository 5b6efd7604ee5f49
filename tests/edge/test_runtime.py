"""Real interpreters on the real test models: answers, input checks, runtime selection."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edge.errors import ModelError
from edge.inference.preprocess import Preprocessor, crop_box
from edge.inference.runtime import interpreter_class, load_model
from proto.inputspec import InputSpec

LABELS = ["bright", "dark", "mid"]


def uniform(level: float, h: int = 480, w: int = 640) -> np.ndarray:
    return np.full((h, w, 3), int(round(level * 255)), np.uint8)


@pytest.mark.parametrize("name", ["brightness_float", "brightness_int8"])
def test_brightness_models_answer_by_brightness(models_dir, name):  # noqa: ANN001
    model = load_model(models_dir / f"{name}.tflite", labels=LABELS, threads=1)
    try:
        mid = model.infer(uniform(0.5))
        bright = model.infer(uniform(0.9))
        assert mid.dtype == np.float32 and mid.shape == (3,)
        assert mid.max() < 0.45, mid                       # ~1/3 each: low confidence
        assert int(np.argmax(bright)) == LABELS.index("bright")
        assert bright.max() > 0.95, bright
        assert model.labels == LABELS
        assert len(model.ref.sha256) == 64 and model.ref.name == name
    finally:
        model.close()


def test_int8_spec_derived_from_model(models_dir):  # noqa: ANN001
    model = load_model(models_dir / "brightness_int8.tflite", threads=1)
    assert model.spec.shape == [1, 64, 64, 3]
    assert model.spec.dtype == "uint8" and model.spec.scale > 0
    x = model.preprocess(uniform(0.9))
    assert x.dtype == np.uint8 and x.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(model.invoke(x), model.infer(uniform(0.9)))


def test_wrong_spec_for_model_is_refused(models_dir):  # noqa: ANN001
    spec = InputSpec(shape=[1, 96, 96, 3], dtype="uint8", scale=1 / 255)
    with pytest.raises(ModelError, match=r"input spec says uint8\[1, 96, 96, 3\].*\[1, 64, 64, 3\]"):
        load_model(models_dir / "brightness_int8.tflite", spec=spec)


def test_wrong_label_count_is_refused(models_dir):  # noqa: ANN001
    with pytest.raises(ModelError, match="outputs 3 scores but 2 labels"):
        load_model(models_dir / "brightness_int8.tflite", labels=["a", "b"])


def test_wrong_shaped_tensor_is_refused(models_dir):  # noqa: ANN001
    model = load_model(models_dir / "brightness_int8.tflite", threads=1)
    with pytest.raises(ModelError, match="does not match"):
        model.invoke(np.zeros((1, 32, 32, 3), np.uint8))


def test_garbage_model_file(tmp_path):  # noqa: ANN001
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(ModelError, match="bad.tflite is not a loadable TFLite model"):
        load_model(bad)
    with pytest.raises(ModelError, match="cannot read model file"):
        load_model(tmp_path / "missing.tflite")


def test_runtime_selection_honours_config(models_dir):  # noqa: ANN001
    available = [n for n, mod in (("tflite-runtime", "tflite_runtime"), ("ai-edge-litert", "ai_edge_litert"))
                 if importlib.util.find_spec(mod) is not None]
    assert available, "no TFLite runtime installed"
    assert interpreter_class("auto")[0] == available[0]
    for name in available:
        model = load_model(models_dir / "brightness_int8.tflite", runtime=name, threads=1)
        assert model.runtime == name
    missing = [n for n, mod in (("tflite-runtime", "tflite_runtime"), ("ai-edge-litert", "ai_edge_litert"))
               if importlib.util.find_spec(mod) is None]
    for name in missing:
        with pytest.raises(ModelError, match="no TFLite runtime available"):
            load_model(models_dir / "brightness_int8.tflite", runtime=name)
    with pytest.raises(ModelError, match="unknown runtime"):
        interpreter_class("onnx")


def test_preprocess_follows_inputspec():
    bgr = np.zeros((4, 8, 3), np.uint8)
    bgr[..., 0] = 10   # blue
    bgr[..., 2] = 200  # red
    f = Preprocessor(InputSpec(shape=[1, 4, 8, 3], normalization="-1_1"))(bgr)
    np.testing.assert_allclose(f[0, 0, 0], [200 / 127.5 - 1, -1.0, 10 / 127.5 - 1], rtol=1e-5)
    q = Preprocessor(InputSpec(shape=[1, 2, 2, 3], dtype="int8", scale=1 / 255, zero_point=-128,
                               color_order="bgr"))(bgr)
    assert q.dtype == np.int8 and q.shape == (1, 2, 2, 3)
    assert q[0, 0, 0].tolist() == [10 - 128, -128, 200 - 128]
    assert crop_box(480, 640, 96, 96) == (0, 480, 80, 560)
    assert crop_box(640, 480, 96, 96) == (80, 560, 0, 480)


def test_preprocessor_reuses_buffers_but_call_returns_fresh_arrays():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (72, 128, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (72, 128, 3), dtype=np.uint8)
    for spec in (InputSpec(shape=[1, 16, 16, 3], dtype="uint8", scale=1 / 255, zero_point=0),
                 InputSpec(shape=[1, 16, 16, 3], dtype="int8", scale=1 / 255, zero_point=-128),
                 InputSpec(shape=[1, 16, 16, 3], normalization="-1_1"),
                 InputSpec(shape=[1, 16, 16, 1], dtype="uint8", scale=1 / 255, zero_point=0,
                           resize="center_crop")):
        pre = Preprocessor(spec)
        want_a, want_b = pre(a), pre(b)
        assert want_a.shape == tuple(spec.shape) and want_a.dtype == np.dtype(spec.dtype)
        assert not np.shares_memory(want_a, want_b)
        assert not np.array_equal(want_a, want_b)  # the first result was not overwritten by the second
        x = pre.into(a)
        np.testing.assert_array_equal(x, want_a)
        y = pre.into(b)
        assert np.shares_memory(x, y)  # into() reuses one buffer: no per-frame allocation
        np.testing.assert_array_equal(y, want_b)
        np.testing.assert_array_equal(pre(a), want_a)
        np.testing.assert_array_equal(pre(a[:, :, 0]), pre(np.repeat(a[:, :, :1], 3, axis=2)))  # grey input


def test_infer_from_two_threads_matches_serial(models_dir):  # noqa: ANN001
    import threading

    m = load_model(models_dir / "mobilenet_int8.tflite", threads=1)
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(6)]
    want = [m.infer(f) for f in frames]
    got: dict = {}

    def worker(k: int) -> None:
        for _ in range(5):
            for i, f in enumerate(frames):
                got.setdefault((k, i), []).append(m.infer(f))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 2 * len(frames)
    for (_, i), results in got.items():
        for r in results:
            np.testing.assert_array_equal(r, want[i])
    m.close()
    with pytest.raises(ModelError, match="closed"):
        m.infer(frames[0])


def test_signed_int8_model_answers_like_the_unsigned_one(models_dir):  # noqa: ANN001
    """Converters emit int8 (signed) I/O with inference_input_type=tf.int8: zero point near -128."""
    signed = load_model(models_dir / "brightness_sint8.tflite", labels=LABELS, threads=1)
    unsigned = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1)
    try:
        assert signed.spec.dtype == "int8" and signed.spec.zero_point < -100 and signed.spec.scale > 0
        x = signed.preprocess(uniform(0.9))
        assert x.dtype == np.int8 and int(x.min()) >= -128 and int(x.max()) > 0
        for level, want in ((0.9, "bright"), (0.1, "dark")):
            s = signed.infer(uniform(level))
            assert s.dtype == np.float32 and LABELS[int(np.argmax(s))] == want and s.max() > 0.9, s
            np.testing.assert_allclose(s, unsigned.infer(uniform(level)), atol=0.02)
        mid = signed.infer(uniform(0.5))
        assert mid.max() < 0.45 and abs(float(mid.sum()) - 1.0) < 0.02  # dequantized, not raw int8 codes
    finally:
        signed.close()
        unsigned.close()


@pytest.mark.needs_tf
def test_tensorflow_runtime_when_configured(models_dir, tmp_path):  # noqa: ANN001
    """runtime = "tensorflow" (tf.lite) gives the same answers; auto never picks it. In a subprocess: the
    test process itself stays free of TensorFlow."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    probe = (
        "import json, sys, numpy as np\n"
        "from edge.inference.runtime import load_model\n"
        f"p = {str(models_dir / 'brightness_int8.tflite')!r}\n"
        "auto = load_model(p, threads=1)\n"
        "assert 'tensorflow' not in sys.modules\n"
        "tf = load_model(p, runtime='tensorflow', threads=1)\n"
        "out = {'auto': auto.runtime, 'tf': tf.runtime, 'diff': 0.0}\n"
        "for lv in (0.1, 0.5, 0.9):\n"
        "    f = np.full((48, 64, 3), int(lv * 255), np.uint8)\n"
        "    out['diff'] = max(out['diff'], float(np.abs(auto.infer(f) - tf.infer(f)).max()))\n"
        "print(json.dumps(out))\n")
    env = dict(os.environ, PYTHONPATH=str(repo), TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["auto"] in ("tflite-runtime", "ai-edge-litert") and out["tf"] == "tensorflow"
    assert out["diff"] < 0.02
