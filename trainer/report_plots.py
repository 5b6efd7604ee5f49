"""The report's charts as PNG bytes (matplotlib, Agg): one function per chart, numbers in, PNG out.

Every chart says what its axes measure: the fold chart counts folds 1..k in integers, the size chart
shows each model's raw .tflite bytes beside its gzip bytes (the download), the latency chart names the
runtime and machine it was measured on, the threshold chart marks the chosen point.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Sequence

DPI = 96
RAW_COLOR, GZIP_COLOR = "#4477aa", "#88ccee"
SENT_COLOR, CAUGHT_COLOR = "#cc6677", "#117733"
RULE_COLORS = {"confidence": "#4477aa", "margin": "#aa7744", "entropy": "#777777"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _plt().close(fig)
    return buf.getvalue()


def learning_curves(history: Dict[str, List[float]]) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, keys, title in ((axes[0], ("loss", "val_loss"), "loss"),
                            (axes[1], ("accuracy", "val_accuracy"), "accuracy")):
        for key in keys:
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key],
                        label=key.replace("val_", "held-out ") if key.startswith("val_") else f"training {key}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def fold_accuracy(accuracy: Sequence[float], macro_f1: Sequence[float], mean: float, std: float) -> bytes:
    plt = _plt()
    k = len(accuracy)
    folds = list(range(1, k + 1))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    ax.bar([f - width / 2 for f in folds], accuracy, width, color="#44aa77", label="accuracy")
    ax.bar([f + width / 2 for f in folds], macro_f1, width, color="#aaccbb", label="macro F1")
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean accuracy {mean:.3f} \u00b1 {std:.3f}")
    ax.set_xticks(folds)
    ax.set_xticklabels([str(f) for f in folds])
    ax.set_xlabel("fold")
    ax.set_ylabel("validation score")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def size_chart(models: Sequence[str], raw_bytes: Sequence[int], gzip_bytes: Sequence[int]) -> bytes:
    """Grouped bars: every model's raw .tflite size beside its gzip size, in KiB, values printed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    xs = list(range(len(models)))
    width = 0.38
    bars_raw = ax.bar([x - width / 2 for x in xs], [b / 1024 for b in raw_bytes], width, color=RAW_COLOR,
                      label="raw .tflite file")
    bars_gz = ax.bar([x + width / 2 for x in xs], [b / 1024 for b in gzip_bytes], width, color=GZIP_COLOR,
                     label="gzip (what a device downloads)")
    for bars in (bars_raw, bars_gz):
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(xs)
    ax.set_xticklabels(models)
    ax.set_ylabel("size, KiB")
    ax.set_title("model size: raw vs gzip")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    ax.margins(y=0.15)
    fig.tight_layout()
    return _png(fig)


def latency_chart(models: Sequence[str], median_ms: Sequence[float], runtime: str, machine: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bars = ax.bar(models, median_ms, color="#aa7744")
    ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_ylabel("ms per inference (median)")
    ax.set_title(f"latency on {runtime}\n{machine}", fontsize=9)
    ax.margins(y=0.15)
    fig.tight_layout()
    return _png(fig)


def threshold_chart(points: List[Dict[str, Any]], n: int, n_errors: int, target: float,
                    chosen: Optional[float], in_bundle: float, source: str,
                    rules: Dict[str, Dict[str, Any]]) -> bytes:
    """Left: share of held-out frames sent and of errors caught against the confidence threshold, the target
    share and the bundle's threshold marked. Right: errors caught against frames sent for each rule."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    ax = axes[0]
    ts = [p["threshold"] for p in points]
    ax.plot(ts, [p["sent"] / n for p in points], color=SENT_COLOR, label="frames sent (uplink volume)")
    if n_errors:
        ax.plot(ts, [p["caught"] / n_errors for p in points], color=CAUGHT_COLOR, label="errors caught")
        ax.axhline(target, color=CAUGHT_COLOR, ls=":", lw=1, label=f"target: {target:.0%} of errors")
    sent_at = next((p["sent"] / n for p in points if abs(p["threshold"] - in_bundle) < 1e-9), None)
    ax.axvline(in_bundle, color="k", ls="--", lw=1, label=f"in the bundle: {in_bundle:.2f} ({source})")
    if sent_at is not None:
        ax.plot([in_bundle], [sent_at], "o", color=SENT_COLOR)
    if chosen is not None and n_errors:
        caught = next(p["caught"] for p in points if abs(p["threshold"] - chosen) < 1e-9) / n_errors
        ax.plot([chosen], [caught], "o", color=CAUGHT_COLOR, ms=7,
                label=f"chosen from the data: {chosen:.2f}")
    ax.set_xlabel("confidence threshold (a frame is sent when its top score is below it)")
    ax.set_ylabel(f"share of the {n} held-out frames / {n_errors} errors", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    ax.set_title("confidence rule")
    ax = axes[1]
    for rule, r in rules.items():
        if not n_errors:
            break
        pts = sorted(r["points"], key=lambda p: (p["sent"], p["caught"]))
        ax.plot([p["sent"] / n for p in pts], [p["caught"] / n_errors for p in pts], color=RULE_COLORS[rule],
                label=rule, drawstyle="steps-post")
        ch = r.get("chosen")
        if ch:
            ax.plot([ch["sent"] / n], [ch["caught"] / n_errors], "o", color=RULE_COLORS[rule])
    if n_errors:
        ax.axhline(target, color=CAUGHT_COLOR, ls=":", lw=1)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=3, frameon=False)
    else:
        ax.text(0.5, 0.5, "no errors on held-out:\nnothing to catch", ha="center", va="center")
    ax.set_xlabel("share of frames sent")
    ax.set_ylabel("share of errors caught")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("every rule: errors caught per frame sent (dots: each rule's choice)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def reliability_chart(curves: Dict[str, Dict[str, Any]]) -> bytes:
    """Accuracy against mean confidence per bin for each model, the diagonal = calibrated; ECE in the legend."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="#999999", ls="--", lw=1, label="calibrated")
    colors = {"int8": "#4477aa", "float": "#ee7733"}
    for name, r in curves.items():
        pts = [(b["confidence"], b["accuracy"], b["count"]) for b in r["bins"] if b["count"]]
        if not pts:
            continue
        ece = r["ece"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors.get(name, "k"),
                label=f"{name}: ECE {ece:.3f}" if ece is not None else name)
    ax.set_xlabel("mean top score in the bin (what the model claims)")
    ax.set_ylabel("accuracy in the bin", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("reliability diagram (held-out)", fontsize=10)
    ax = axes[1]
    width = 0.045
    for i, (name, r) in enumerate(curves.items()):
        mids = [(b["low"] + b["high"]) / 2 + (i - 0.5) * width for b in r["bins"]]
        ax.bar(mids, [b["count"] for b in r["bins"]], width, color=colors.get(name, "k"), label=name)
    ax.set_xlabel("top score")
    ax.set_ylabel("held-out images")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("how many images fall in each bin", fontsize=10)
    fig.tight_layout()
    return _png(fig)
