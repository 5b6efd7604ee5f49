"""The soak benchmark's PNG plots (matplotlib, Agg), written beside bench-out/results.json: numbers in, a file out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def soak(path: Path, series: Dict[str, Any], targets: Dict[str, float]) -> Path:
    """Three panels over the run's minutes: frames/s published and committed (per second), publish -> committed
    p50/p95/max per minute against the p95 target, the hub's resident memory against first minute + 10 %."""
    plt = _plt()
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    t = [x / 60.0 for x in series["second"]]
    a.plot(t, series["published_fps"], lw=0.8, label="published (load generator)")
    a.plot(t, series["committed_fps"], lw=0.8, label="committed (hub)", alpha=0.8)
    a.set_ylabel("frames/s")
    a.set_title(f"soak: {series['devices']} devices x {series['fps']:g} fps into one hub "
                f"({series['frame_bytes'] // 1000} KB frames, SQLite, plain broker)")
    a.legend(loc="lower right")
    m = [x + 0.5 for x in series["minute"]]
    if series.get("p95_10s_ms"):
        b.plot([(x + 5) / 60.0 for x in series["t_10s"]], series["p95_10s_ms"], lw=0.7, color="grey",
               label="p95 per 10 s")
    b.plot(m, series["p50_ms"], marker="o", label="p50 per minute")
    b.plot(m, series["p95_ms"], marker="o", label="p95 per minute")
    b.plot(m, series["max_ms"], marker=".", ls=":", label="max per minute")
    b.axhline(targets["p95_ms"], color="red", ls="--", lw=1, label=f"target p95 < {targets['p95_ms']:g} ms")
    b.set_yscale("log")
    b.set_ylabel("publish -> committed, ms")
    b.legend(loc="upper right")
    rss = [x / 1024.0 for x in series["rss_kb"]]
    c.plot([x / 60.0 for x in series["rss_t"]], rss, label="hub RSS")
    if series.get("rss_base_kb"):
        base = series["rss_base_kb"] / 1024.0
        c.axhline(base, color="grey", ls=":", lw=1, label="after the first minute")
        c.axhline(base * (1 + targets["rss_growth"]), color="red", ls="--", lw=1,
                  label=f"target: < +{targets['rss_growth'] * 100:.0f} %")
    c.set_ylabel("MB")
    c.set_xlabel("minutes")
    c.set_ylim(bottom=0)
    c.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def kill(path: Path, series: Dict[str, Any], marks: Dict[str, float]) -> Path:
    """Two workers, one SIGKILLed and restarted: committed frames/s per worker (per second), publish -> committed
    per second (p50, max) and each worker's resident memory, with the kill and the restart marked."""
    plt = _plt()
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    t = series["second"]
    a.plot(t, series["published_fps"], lw=0.8, color="black", label="published")
    for hub, fps in sorted(series["committed_fps_by_hub"].items()):
        a.plot(t, fps, lw=0.9, label=f"committed by {hub}")
    a.set_ylabel("frames/s")
    a.set_title(f"two hub workers, {series['devices']} devices x {series['fps']:g} fps: one SIGKILLed, restarted")
    b.plot(t, series["p50_ms"], lw=0.9, label="p50 (frames published in that second)")
    b.plot(t, series["p95_ms"], lw=0.9, label="p95")
    b.plot(t, series["max_ms"], lw=0.9, label="max")
    b.set_yscale("log")
    b.set_ylabel("publish -> committed, ms")
    for name, rss in sorted(series["rss_kb_by_hub"].items()):
        c.plot(series["rss_t"], [x / 1024.0 for x in rss], label=f"{name} RSS")
    c.set_ylabel("MB")
    c.set_xlabel("seconds")
    c.set_ylim(bottom=0)
    for ax in (a, b, c):
        for label, x in marks.items():
            ax.axvline(x, color="red" if "kill" in label else "green", ls="--", lw=1)
        ax.legend(loc="lower right", fontsize=8)
    a.text(marks.get("kill", 0), a.get_ylim()[1] * 0.95, " SIGKILL", color="red", va="top")
    if "restart" in marks:
        a.text(marks["restart"], a.get_ylim()[1] * 0.95, " restart", color="green", va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def per_second(times: Sequence[float], start: float, seconds: int) -> List[int]:
    out = [0] * max(0, seconds)
    for x in times:
        i = int(x - start)
        if 0 <= i < len(out):
            out[i] += 1
    return out
