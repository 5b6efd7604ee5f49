"""Evaluation of .tflite models with the edge's own runtime (edge.inference.runtime, the device preprocessing from
edge.inference.preprocess), the accuracy gate, and the bundle's self-test cases."""

from __future__ import annotations

import base64
import os
import platform
import time
from typing import Any, Dict, List

import numpy as np

from edge.inference import load_model
from proto.inputspec import InputSpec
from trainer.errors import GateError
from trainer.preprocess import model_input
from trainer.train import metrics


def spec_of(tflite: bytes, base: InputSpec) -> InputSpec:
    """The input spec of a converted model: base's colour order/normalization/resize + its real dtype/quant."""
    m = load_model(tflite, color_order=base.color_order, normalization=base.normalization, resize=base.resize)
    try:
        return m.spec
    finally:
        m.close()


def run_tflite(tflite: bytes, spec: InputSpec, pixels: np.ndarray, threads: int = 1) -> np.ndarray:
    """Scores (N x classes) of the model on stored pixels, through the edge runtime."""
    m = load_model(tflite, spec=spec, threads=threads)
    try:
        return np.stack([m.invoke(model_input(p, spec)) for p in pixels])
    finally:
        m.close()


def latency_ms(tflite: bytes, spec: InputSpec, pixels: np.ndarray, runs: int = 50,
               threads: int = 1) -> Dict[str, Any]:
    m = load_model(tflite, spec=spec, threads=threads)
    try:
        xs = [model_input(pixels[i % len(pixels)], spec) for i in range(min(runs, 8))]
        for x in xs[:3]:
            m.invoke(x)
        times = []
        for i in range(runs):
            t0 = time.perf_counter()
            m.invoke(xs[i % len(xs)])
            times.append((time.perf_counter() - t0) * 1000.0)
        return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
                "runtime": m.runtime, "runtime_version": _version(m.runtime), "threads": threads}
    finally:
        m.close()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def evaluate_tflite(tflite: bytes, spec: InputSpec, pixels: np.ndarray, labels: np.ndarray,
                    n_classes: int) -> Dict[str, Any]:
    scores = run_tflite(tflite, spec, pixels)
    return metrics(labels, scores.argmax(1), n_classes)


def machine() -> Dict[str, Any]:
    """What the latency was measured on: CPU model, architecture, cores, OS (this machine, not a device)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu or "unknown CPU", "arch": platform.machine(), "cores": os.cpu_count() or 0,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


MAX_MISTAKES = 500  # misclassified held-out images listed in evaluate.json (the report shows the first ones)


def mistakes(scores: np.ndarray, labels: np.ndarray, index: np.ndarray) -> List[Dict[str, Any]]:
    """The held-out images the model gets wrong: dataset index, true and predicted class, top score
    (most confident first: the surprising ones)."""
    pred = scores.argmax(1)
    wrong = np.nonzero(pred != labels)[0]
    rows = [{"index": int(index[i]), "true": int(labels[i]), "predicted": int(pred[i]),
             "score": float(scores[i].max())} for i in wrong]
    rows.sort(key=lambda r: -r["score"])
    return rows[:MAX_MISTAKES]


def gate(float_acc: float, int8_acc: float, max_drop_points: float) -> Dict[str, Any]:
    drop = (float_acc - int8_acc) * 100.0
    return {"float_accuracy": float_acc, "int8_accuracy": int8_acc, "drop_points": drop,
            "max_drop_points": max_drop_points, "passed": bool(drop <= max_drop_points + 1e-9)}


def enforce_gate(result: Dict[str, Any]) -> None:
    if not result.get("passed"):
        raise GateError(
            f"evaluation gate failed: int8 accuracy {result['int8_accuracy'] * 100:.1f}% is "
            f"{result['drop_points']:.1f} points below the float model's {result['float_accuracy'] * 100:.1f}% "
            f"(allowed: {result['max_drop_points']:.1f}); packaging refused - check the representative data/"
            "quantization, try [optimize] qat = true, or raise [gate] max_accuracy_drop")


def self_test_cases(tflite: bytes, spec: InputSpec, pixels: np.ndarray, labels: np.ndarray, n: int
                    ) -> List[Dict[str, Any]]:
    """n held-out inputs (one per class first) as preprocessed tensors + the int8 model's edge-runtime scores."""
    chosen: List[int] = []
    for c in np.unique(labels):
        chosen.append(int(np.nonzero(labels == c)[0][0]))
    chosen = chosen[:n] + [i for i in range(len(labels)) if i not in chosen][: max(0, n - len(chosen))]
    m = load_model(tflite, spec=spec, threads=1)
    try:
        cases = []
        for i in chosen[:n]:
            x = model_input(pixels[i], spec)
            cases.append({"input": base64.b64encode(x.tobytes()).decode("ascii"),
                          "expected": [float(v) for v in m.invoke(x)]})
        return cases
    finally:
        m.close()


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
