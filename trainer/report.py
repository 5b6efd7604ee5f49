"""The run report: PNG plots (matplotlib Agg) + the same figures as JSON + one HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Dict, List

from trainer.optimize import SCHEDULE_TEXT


def _load(p: Path) -> Any:
    return json.loads(p.read_text("utf-8")) if p.is_file() else None


def gather(rundir: Path) -> Dict[str, Any]:
    return {
        "cleaning": _load(rundir / "ingest" / "cleaning.json"),
        "history": _load(rundir / "train" / "history.json"),
        "cv": _load(rundir / "train" / "cv.json"),
        "train_metrics": _load(rundir / "train" / "metrics.json"),
        "optimize": _load(rundir / "optimize" / "optimize.json"),
        "evaluate": _load(rundir / "evaluate" / "evaluate.json"),
    }


def figures(data: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers behind every plot."""
    figs: Dict[str, Any] = {}
    if data["history"]:
        figs["learning_curves"] = data["history"]
    if data["cv"] and data["cv"].get("folds"):
        figs["fold_accuracy"] = {"accuracy": [f["accuracy"] for f in data["cv"]["folds"]],
                                 "macro_f1": [f["macro_f1"] for f in data["cv"]["folds"]],
                                 "mean": data["cv"]["accuracy"]["mean"], "std": data["cv"]["accuracy"]["std"]}
    ev = data["evaluate"]
    if ev:
        st = ev["stages"]
        figs["confusion_matrix"] = {"labels": ev["class_names"], "matrix": st["pruned_int8"]["confusion"]}
        figs["size_latency"] = {
            "stages": ["float", "pruned", "int8", "pruned+int8 gzip"],
            "bytes": [st["float"]["bytes"], st["pruned_float"]["bytes"], st["int8"]["bytes"],
                      st["pruned_int8"]["gzip_bytes"]],
            "latency_ms": [st["float"]["latency"]["median_ms"], st["pruned_float"]["latency"]["median_ms"],
                           st["int8"]["latency"]["median_ms"], st["pruned_int8"]["latency"]["median_ms"]],
            "accuracy": [st["float"]["accuracy"], st["pruned_float"]["accuracy"], st["int8"]["accuracy"],
                         st["pruned_int8"]["accuracy"]],
        }
    return figs


def _save_png(fig: Any, path: Path) -> None:
    import io

    from proto.atomic import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    write_bytes(path, buf.getvalue())


def _plots(figs: Dict[str, Any], out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if "learning_curves" in figs:
        h = figs["learning_curves"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for key in ("loss", "val_loss"):
            if key in h:
                axes[0].plot(range(1, len(h[key]) + 1), h[key], label=key)
        for key in ("accuracy", "val_accuracy"):
            if key in h:
                axes[1].plot(range(1, len(h[key]) + 1), h[key], label=key)
        axes[0].set_title("loss")
        axes[1].set_title("accuracy")
        for a in axes:
            a.set_xlabel("epoch")
            a.legend()
        fig.tight_layout()
        _save_png(fig, out / "learning_curves.png")
        plt.close(fig)
        made.append("learning_curves")
    if "fold_accuracy" in figs:
        f = figs["fold_accuracy"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(range(len(f["accuracy"])), f["accuracy"], color="#4a7")
        ax.axhline(f["mean"], color="k", ls="--", label=f"mean {f['mean']:.3f} +- {f['std']:.3f}")
        ax.set_xlabel("fold")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.legend()
        fig.tight_layout()
        _save_png(fig, out / "fold_accuracy.png")
        plt.close(fig)
        made.append("fold_accuracy")
    if "confusion_matrix" in figs:
        c = figs["confusion_matrix"]
        n = len(c["labels"])
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
        ax.imshow(c["matrix"], cmap="Blues")
        ax.set_xticks(range(n))
        ax.set_xticklabels(c["labels"], rotation=90)
        ax.set_yticks(range(n))
        ax.set_yticklabels(c["labels"])
        for i, row in enumerate(c["matrix"]):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("int8 (pruned) on held-out test")
        fig.tight_layout()
        _save_png(fig, out / "confusion_matrix.png")
        plt.close(fig)
        made.append("confusion_matrix")
    if "size_latency" in figs:
        s = figs["size_latency"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        axes[0].bar(s["stages"], [b / 1024 for b in s["bytes"]], color="#47a")
        axes[0].set_ylabel("KiB")
        axes[0].set_title("model size")
        axes[1].bar(["float", "pruned", "int8", "pruned+int8"], s["latency_ms"], color="#a74")
        axes[1].set_ylabel("ms (median, edge runtime)")
        axes[1].set_title("latency")
        for a in axes:
            a.tick_params(axis="x", labelrotation=20)
        fig.tight_layout()
        _save_png(fig, out / "size_latency.png")
        plt.close(fig)
        made.append("size_latency")
    return made


def _table(rows: List[List[Any]], head: List[str]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def write_report(rundir: Path) -> Path:
    from proto.atomic import write_bytes, write_json

    out = rundir / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = gather(rundir)
    figs = figures(data)
    write_json(out / "figures.json", figs)
    made = _plots(figs, out)
    parts = ["<!doctype html><meta charset='utf-8'><title>Kestrel training report</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}</style>",
             f"<h1>Kestrel training report</h1><p>run: {html.escape(str(rundir))}</p>"]
    cl = data["cleaning"]
    if cl:
        parts.append("<h2>Data</h2>")
        parts.append(_table([[k, v] for k, v in cl["classes"].items()], ["class", "images kept"]))
        parts.append(f"<p>seen {cl['seen']}, kept {cl['kept']}, split {cl.get('split')}; near-duplicate groups: "
                     f"{cl['near_duplicate_groups']} (a group never straddles a split)</p>")
        for w in cl.get("warnings", []):
            parts.append(f"<p><b>warning:</b> {html.escape(str(w))}</p>")
        conflicts = cl.get("near_duplicate_label_conflicts") or []
        if conflicts:
            parts.append("<h3>Near duplicates under different classes (check these labels)</h3>" + _table(
                [[c["group"], ", ".join(f"{f['path']} ({f['label']})" for f in c["files"])] for c in conflicts],
                ["group", "files"]))
        parts.append("<h3>Dropped</h3>" + _table([[k, v] for k, v in cl["dropped_by_reason"].items()],
                                                  ["reason", "count"]))
        parts.append(_table([[d["path"], d["label"], d["reason"], d["detail"]] for d in cl["dropped"][:200]],
                            ["file", "class", "reason", "detail"]))
    cv = data["cv"]
    if cv and not cv.get("skipped"):
        parts.append(f"<h2>Cross-validation ({cv['k']}-fold, stratified, grouped)</h2><p>accuracy "
                     f"{cv['accuracy']['mean']:.4f} &plusmn; {cv['accuracy']['std']:.4f}; macro F1 "
                     f"{cv['macro_f1']['mean']:.4f} &plusmn; {cv['macro_f1']['std']:.4f}</p>")
    for name, title in (("learning_curves", "Learning curves (final model; validation = held-out test)"),
                        ("fold_accuracy", "Per-fold accuracy"), ("confusion_matrix", "Confusion matrix"),
                        ("size_latency", "Size and latency per stage")):
        if name in made:
            parts.append(f"<h2>{title}</h2><img src='{name}.png' alt='{name}'>")
    op = data["optimize"]
    if op:
        parts.append("<h2>Pruning</h2><p>" + html.escape(SCHEDULE_TEXT) + "</p>")
        sched = {k: v for k, v in op.get("schedule", {}).items() if k != "explained"}
        parts.append(_table([[k, v] for k, v in sched.items()], ["schedule", "value"]))
        parts.append(f"<p>measured sparsity of prunable kernels: {op['sparsity']['overall']:.3f}</p>")
    ev = data["evaluate"]
    if ev:
        rows = [[k, f"{v['accuracy']:.4f}", f"{v['macro_f1']:.4f}", v["bytes"], v["gzip_bytes"],
                 f"{v['latency']['median_ms']:.3f}"] for k, v in ev["stages"].items()]
        parts.append("<h2>Held-out evaluation (edge runtime)</h2>" + _table(
            rows, ["model", "accuracy", "macro F1", "bytes", "gzip bytes", "latency ms"]))
        g = ev["gate"]
        parts.append(f"<h2>Gate: {'PASSED' if g['passed'] else 'FAILED'}</h2><p>int8 drop {g['drop_points']:.2f} "
                     f"points (allowed {g['max_drop_points']}); {g.get('n_test', '?')} held-out images, one image = "
                     f"{g.get('points_per_test_image', float('nan')):.2f} points</p>")
        for w in ev.get("warnings", []):
            parts.append(f"<p><b>warning:</b> {html.escape(str(w))}</p>")
    write_bytes(out / "report.html", "\n".join(parts).encode("utf-8"))
    return out / "report.html"
