"""The registry as the Models page and ``GET /api/models`` show it: each version with its report figures
(from the bundle's signed manifest metrics, as the trainer wrote them) and the devices running it."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from hub.store.base import DeviceRecord, ModelRecord

# manifest metric -> what the page calls it (the trainer's names, trainer/pipeline.py package())
FIGURES = (("float_accuracy", "float accuracy", "pct"), ("accuracy", "int8 accuracy", "pct"),
           ("accuracy_drop_points", "int8 vs float (points)", "num"), ("macro_f1", "macro F1", "num"),
           ("bytes", "model size", "bytes"), ("latency_ms", "latency (trainer machine)", "ms"),
           ("sparsity", "sparsity", "pct"), ("cv_accuracy_mean", "k-fold accuracy", "pct"),
           ("ece", "calibration error (ECE, int8)", "num"), ("n_test", "held-out images", "num"))
# metrics["sampling"] (the trainer's threshold choice, issue 15) -> what the page calls it
SAMPLING = (("threshold", "sampling threshold", "num"), ("sent_share", "frames it sends (held-out)", "pct"),
            ("caught_share", "errors it catches (held-out)", "pct"))


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def show(v: Optional[float], kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "bytes":
        return f"{v / 1024:.1f} KiB" if v < 1024 * 1024 else f"{v / 1024 / 1024:.2f} MiB"
    if kind == "ms":
        return f"{v:.2f} ms"
    return f"{v:.3g}" if isinstance(v, float) and not v.is_integer() else f"{v:.0f}"


def confusion(rec: ModelRecord) -> Optional[Dict[str, Any]]:
    """The confusion matrix of the report (``confusion_matrix`` with ``class_names``; else the model's
    labels), or None when the manifest has none or it does not fit its class names."""
    m = rec.metrics.get("confusion_matrix", rec.metrics.get("confusion"))
    names = rec.metrics.get("class_names") or rec.labels
    if not isinstance(m, list) or not isinstance(names, list) or len(m) != len(names):
        return None
    try:
        rows = [[float(x) for x in row] for row in m]
    except (TypeError, ValueError):
        return None
    if any(len(r) != len(names) for r in rows):
        return None
    return {"labels": [str(n) for n in names], "matrix": rows}


def model_json(rec: ModelRecord, devices: Sequence[DeviceRecord]) -> Dict[str, Any]:
    running = [d.device_id for d in devices if d.reported_model == rec.model_name
               and d.reported_version == rec.version]
    desired = [d.device_id for d in devices if d.desired_model == rec.model_name
               and d.desired_version == rec.version]
    figures = []
    sampling = rec.metrics.get("sampling")
    found = [(key, title, kind, rec.metrics.get(key)) for key, title, kind in FIGURES]
    if isinstance(sampling, dict):
        found += [(f"sampling.{key}", title, kind, sampling.get(key)) for key, title, kind in SAMPLING]
    for key, title, kind, raw in found:
        v = _number(raw)
        if v is None:  # not in this bundle's report
            continue
        figures.append({"key": key, "title": title, "value": v, "text": show(v, kind)})
    return {"model_name": rec.model_name, "version": rec.version, "bundle_sha256": rec.bundle_sha256,
            "bundle_bytes": rec.size, "model_sha256": rec.model_sha256, "key_id": rec.key_id,
            "created_ms": rec.created_ms, "labels": list(rec.labels), "metrics": dict(rec.metrics),
            "figures": figures, "confusion": confusion(rec), "running_on": running, "desired_by": desired}


def models(records: List[ModelRecord], devices: Sequence[DeviceRecord]) -> List[Dict[str, Any]]:
    """Versions grouped by model name (names in order, highest version first)."""
    return [model_json(r, devices) for r in sorted(records, key=lambda r: (r.model_name, -r.version))]
