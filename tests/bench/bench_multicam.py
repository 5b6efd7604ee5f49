"""Several cameras: one daemon with four file sources against four daemons with one each, on the same cores.

``python -m tests.bench.bench_multicam [--out DIR] [--frames N] [--repeats R]`` (PYTHONPATH=repo; part of
``make bench``). The model and the video are bench_edge's (MobileNetV2 int8 with random weights, a generated
1280x720 MJPG; the pair calibrated so that decoding a frame costs about what preprocess+invoke costs), each
source reading its own copy of the video from the start, ``FRAMES`` frames each. Every daemon runs in its
own process (tests/bench/multicam_worker.py: a real :class:`edge.daemon.Daemon` from an edge.toml-like
config, its own data_dir, publishing to one real local Mosquitto), so memory and the GIL are what they
are in production; the workers are started first and then all at once.

* ``one``: one daemon, ``[[sources]]`` x 4, one interpreter (``[model] threads = 1``, as bench_edge);
  aggregate rate = frames processed / (pipeline start -> last frame inferred and stored);
* ``one_batch``: the same with ``[pipeline] max_batch = 4`` (frames of the four sources through one invoke);
* ``four``: four daemons, one source each, same config otherwise; aggregate rate = frames processed by all /
  (first pipeline start -> last pipeline end);
* ``one_default`` / ``four_default``: the same two with the thread count left at its default (0 = every
  core this process may use: what a user gets who runs one daemon per camera out of the box).

The pipelined bound for four sources on ``C`` cores: the four capture threads may decode on every core,
the one interpreter thread runs on one; so the daemon can go no faster than its interpreter alone
(``1/pre_invoke``) nor than the cores can do the work of a frame (``C/(decode + pre_invoke)``):
``bound = min(1/pre_invoke, C/(decode + pre_invoke))`` (for one source and ``C = 2`` this is bench_edge's
``1/max(decode, pre_invoke)`` when the two are equal). Targets: one >= 0.9 x bound, one >= 1.5 x four,
RSS of one <= 0.4 x the sum of the four's. Each figure is the best of ``REPEATS`` interleaved runs (RSS:
the lowest peak); the machine is shared, so the load average is recorded. The default sampler runs in
every daemon (the bench model scores every frame low, so each daemon spends its own budget of 30 frames a
minute: the four daemons send four times the frames one daemon sends; their counts are reported).

Figures go to ``DIR/bench_multicam.json``; the plot (aggregate fps over time, RSS over time, the ratios
against their targets) to ``bench_multicam.png`` beside ``results.json`` (the parent of DIR under
tests/bench/run.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from edge.config import usable_cores
from edge.inference.runtime import load_model
from tests.bench import bench_edge
from tests.bench.bench_models import mobilenet_path
from tests.helpers.broker import Mosquitto

REPO = Path(__file__).resolve().parents[2]
SOURCES = 4
FRAMES = 750           # per source: about 5 s per run at the bound on 2 cores
REPEATS = 3
START_TIMEOUT_S = 120.0
TARGETS = {"one_over_bound": 0.9, "one_over_four": 1.5, "rss_one_over_four": 0.4}
RUNS = {  # name: (daemons, threads, max_batch)
    "one": (1, 1, 1), "one_batch": (1, 1, SOURCES), "four": (SOURCES, 1, 1),
    "one_default": (1, 0, 1), "four_default": (SOURCES, 0, 1),
}


def edge_config(name: str, videos: List[Path], data: Path, broker: Mosquitto, threads: int,
                max_batch: int, model: Path) -> Dict[str, Any]:
    return {
        "device": {"id": name, "data_dir": str(data), "log_level": "WARNING"},
        "sources": [{"kind": "file", "uri": str(v), "name": f"cam{i}"} for i, v in enumerate(videos)],
        "model": {"path": str(model), "threads": threads},
        "pipeline": {"max_batch": max_batch},
        "mqtt": {"host": broker.host, "port": broker.port},
        "telemetry": {"interval_s": 0, "metrics_port": 0},
        "update": {"enabled": False},
    }


class Worker:
    """A daemon process (tests/bench/multicam_worker.py) and the JSON lines it prints."""

    def __init__(self, cfg: Dict[str, Any], path: Path) -> None:
        path.write_text(json.dumps(cfg))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.bench.multicam_worker", str(path)],
                                     cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[Dict[str, Any]] = queue.Queue()
        self.progress: List[Tuple[float, int, int]] = []  # (t, processed, rss_kb)
        self.result: Dict[str, Any] = {}
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            obj = json.loads(line)
            if "t" in obj:
                self.progress.append((obj["t"], obj["processed"], obj["rss_kb"]))
            else:
                self.lines.put(obj)

    def wait_line(self, timeout: float) -> Dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError(f"a daemon worker said nothing for {timeout:.0f}s") from None

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> Dict[str, Any]:
        self.result = self.wait_line(timeout)
        _, self.stderr = self.proc.communicate(timeout=timeout)
        if "error" in self.result or self.proc.returncode != 0:
            raise RuntimeError(f"a daemon worker failed: {self.result} {self.stderr[-2000:]}")
        return self.result


def run_once(kind: str, videos: List[Path], frames: int, model: Path, broker: Mosquitto, work: Path) -> Dict[str, Any]:
    daemons, threads, max_batch = RUNS[kind]
    per = len(videos) // daemons
    workers = []
    for d in range(daemons):
        data = work / f"{kind}-{d}"
        shutil.rmtree(data, ignore_errors=True)  # a fresh spool and rate-limit memory per run
        cfg = edge_config(f"bench-{kind}-{d}", videos[d * per:(d + 1) * per], data, broker, threads, max_batch,
                          model)
        workers.append(Worker(cfg, work / f"{kind}-{d}.json"))
    for w in workers:
        w.wait_line(START_TIMEOUT_S)  # ready: imports done, the daemon built
    for w in workers:
        w.go()
    results = [w.finish(START_TIMEOUT_S + 600) for w in workers]
    start = min(r["started_at"] for r in results)
    end = max(r["ended_at"] for r in results)
    processed = sum(r["processed"] for r in results)
    if processed != frames * len(videos) or any(r["errors"] or r["dropped"] for r in results):
        raise RuntimeError(f"{kind}: frames lost or failed: {results}")
    return {"fps": processed / (end - start), "seconds": end - start, "processed": processed,
            "rss_peak_mb": sum(r["rss_peak_kb"] for r in results) / 1024,
            "rss_end_mb": sum(r["rss_kb"] for r in results) / 1024,
            "cpu_ms_per_frame": sum(r["cpu_s"] for r in results) * 1e3 / processed,
            "inference_cpu_ms": sum(r["inference_cpu_s"] for r in results) * 1e3 / processed,
            "capture_cpu_ms": sum(r["capture_cpu_s"] for r in results) * 1e3 / processed,
            "sampled": sum(r["sampled"] for r in results), "batches": sum(r["batches"] for r in results),
            "threads": [r["threads"] for r in results],
            "series": series([w.progress for w in workers], start, end)}


def series(progress: List[List[Tuple[float, int, int]]], start: float, end: float) -> Dict[str, List[float]]:
    """Aggregate fps and summed RSS over time (every process on one time grid, from the first start)."""
    grid = np.arange(start, end + 0.25, 0.25)
    total = np.zeros_like(grid)
    rss = np.zeros_like(grid)
    for prog in progress:
        if not prog:
            continue
        t = np.array([p[0] for p in prog])
        total += np.interp(grid, t, np.array([p[1] for p in prog], float), left=0.0)
        rss += np.interp(grid, t, np.array([p[2] for p in prog], float) / 1024)
    fps = np.diff(total) / np.diff(grid)
    return {"t": [round(float(x - start), 3) for x in grid[1:]], "fps": [round(float(x), 1) for x in fps],
            "rss_mb": [round(float(x), 1) for x in rss[1:]]}


def if_alone(runs: List[Dict[str, Any]], cores: int, daemons: int) -> float:
    """The aggregate rate the best run's CPU per frame allows with ``cores`` idle cores: every daemon's
    inference thread needs its CPU per frame on one core, all the threads together the process CPU."""
    cpu = min(r["cpu_ms_per_frame"] for r in runs) / 1e3
    inf = min(r["inference_cpu_ms"] for r in runs) / 1e3
    return min(daemons / inf, cores / cpu)


def plot(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = {"one": "one daemon, 4 sources", "one_batch": "one daemon, batches of 4",
              "four": "four daemons", "one_default": "one daemon, default threads",
              "four_default": "four daemons, default threads"}
    for kind, label in labels.items():
        s = res["best_series"][kind]
        ax1.plot(s["t"], s["fps"], label=label, linewidth=1.2 if kind in ("one", "four") else 0.8)
        ax2.plot(s["t"], s["rss_mb"], label=label, linewidth=1.2 if kind in ("one", "four") else 0.8)
    ax1.axhline(res["bound_fps"], color="black", linestyle="--", linewidth=0.8, label="pipelined bound")
    ax1.set(title="aggregate frames inferred per second", xlabel="s since the first pipeline start", ylabel="fps")
    ax2.set(title="resident memory (sum over the daemons)", xlabel="s since the first pipeline start",
            ylabel="MiB")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    names = ["one / bound", "one / four", "RSS one / four", "batch / one", "one / four (default threads)"]
    values = [res["one_over_bound"], res["one_over_four"], res["rss_one_over_four"], res["batch_over_one"],
              res["one_default_over_four_default"]]
    targets = [TARGETS["one_over_bound"], TARGETS["one_over_four"], TARGETS["rss_one_over_four"], None, None]
    ax3.barh(names, values, color=["tab:blue"] * len(values))
    for i, tgt in enumerate(targets):
        if tgt is not None:
            ax3.plot([tgt, tgt], [i - 0.4, i + 0.4], color="red", linewidth=2)
        ax3.text(max(values[i], tgt or 0.0) + 0.02, i, f"{values[i]:.2f}", va="center", fontsize=8)
    ax3.set(title="ratios (red: target; RSS: lower is better)", xlim=(0, max(values + [1.5]) + 0.25))
    fig.suptitle(f"bench_multicam: {res['model']}, {res['video']}, {res['cpus']} cores, load "
                 f"{res['load_avg_1m_before']:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out_dir: Path, frames: int = FRAMES, repeats: int = REPEATS) -> Dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("edge").setLevel(logging.WARNING)
    load_before = os.getloadavg()[0]
    cal = bench_edge.calibrate(out_dir)
    c = cal["chosen"]
    model_path = mobilenet_path(c["size"], c["alpha"])
    video = bench_edge.make_video(out_dir / f"multicam_{bench_edge.WIDTH}x{bench_edge.HEIGHT}{c['ext']}", frames,
                                  c["fourcc"], c["noise"])
    videos = [video] * SOURCES  # each source opens and decodes the file itself
    bench_edge.CPU.clear()
    decode_s, sample = bench_edge.decode_time(video)
    model = load_model(model_path, threads=1)
    pi_s = bench_edge.pre_invoke_time(model, sample)
    batchable, runtime = model.batchable, model.runtime
    model.close()
    cores = usable_cores()
    bound = min(1.0 / pi_s, cores / (decode_s + pi_s))
    dec_cpu, pi_cpu = bench_edge.CPU["decode"], bench_edge.CPU["pre_invoke"]
    cpu_bound = min(1.0 / pi_cpu, cores / (dec_cpu + pi_cpu))  # the same bound from CPU time (load-independent)
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in RUNS}
    broker = Mosquitto(out_dir / "mosquitto").start()
    try:
        for _ in range(repeats):
            for kind in RUNS:
                runs[kind].append(run_once(kind, videos, frames, model_path, broker, out_dir))
    finally:
        broker.stop()
    best = {k: max(v, key=lambda r: r["fps"]) for k, v in runs.items()}
    rss = {k: min(r["rss_peak_mb"] for r in v) for k, v in runs.items()}
    res: Dict[str, Any] = {
        "model": f"MobileNetV2 int8 {c['size']} alpha {c['alpha']:g}", "runtime": runtime,
        "video": f"{bench_edge.WIDTH}x{bench_edge.HEIGHT} {c['fourcc']}, {frames} frames x {SOURCES} sources",
        "decode_ms": decode_s * 1e3, "preprocess_invoke_ms": pi_s * 1e3, "cores": cores, "batchable": batchable,
        "bound_fps": bound, "bound_formula": "min(1/pre_invoke, cores/(decode + pre_invoke))",
        **{f"{k}_fps": best[k]["fps"] for k in RUNS},
        **{f"{k}_rss_peak_mb": rss[k] for k in RUNS},
        **{f"{k}_cpu_ms_per_frame": min(r["cpu_ms_per_frame"] for r in runs[k]) for k in RUNS},
        **{f"{k}_thread_cpu_ms": {"capture": min(r["capture_cpu_ms"] for r in runs[k]),
                                  "inference": min(r["inference_cpu_ms"] for r in runs[k])} for k in RUNS},
        **{f"{k}_sampled": best[k]["sampled"] for k in RUNS},
        "one_over_bound": best["one"]["fps"] / bound,
        # load-independent diagnostics: the rate each run's CPU per frame allows on `cores` idle cores (the one
        # inference thread of a daemon can use one core at most), against the bound from the isolated stages'
        # CPU time; and the CPU one frame costs in one daemon against four
        "decode_cpu_ms": dec_cpu * 1e3, "preprocess_invoke_cpu_ms": pi_cpu * 1e3, "cpu_bound_fps": cpu_bound,
        **{f"{k}_if_alone_fps": if_alone(runs[k], cores, RUNS[k][0]) for k in RUNS},
        "one_if_alone_over_cpu_bound": if_alone(runs["one"], cores, 1) / cpu_bound,
        "one_over_four_if_alone": if_alone(runs["one"], cores, 1) / if_alone(runs["four"], cores, SOURCES),
        "one_over_four": best["one"]["fps"] / best["four"]["fps"],
        "rss_one_over_four": rss["one"] / rss["four"],
        "batch_over_one": best["one_batch"]["fps"] / best["one"]["fps"],
        "one_batch_batches": best["one_batch"]["batches"],
        "one_default_over_four_default": best["one_default"]["fps"] / best["four_default"]["fps"],
        "rss_one_default_over_four_default": rss["one_default"] / rss["four_default"],
        "default_threads": best["one_default"]["threads"],
        "runs_fps": {k: [round(r["fps"], 1) for r in v] for k, v in runs.items()},
        "targets": TARGETS, "repeats": repeats,
        "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "best_series": {k: best[k]["series"] for k in RUNS},
    }
    png = out_dir.parent / "bench_multicam.png"
    plot(res, png)
    res["plot"] = str(png)
    rows = [("model / video", f"{res['model']}; {res['video']}"),
            ("decode / preprocess+invoke per frame", f"{res['decode_ms']:.2f} / {res['preprocess_invoke_ms']:.2f} ms"),
            (f"pipelined bound, 4 sources, {cores} cores", f"{bound:8.1f} fps  ({res['bound_formula']})"),
            *[(f"{k}", f"{best[k]['fps']:8.1f} fps  (runs: {', '.join(f'{r:.0f}' for r in res['runs_fps'][k])}); "
               f"RSS peak {rss[k]:.0f} MiB; CPU {res[k + '_cpu_ms_per_frame']:.2f} ms/frame; "
               f"{best[k]['sampled']} sampled") for k in RUNS],
            ("one / bound      (target >= 0.9)", f"{res['one_over_bound']:.2f}"),
            ("diagnostic: one if alone / CPU bound", f"{res['one_if_alone_over_cpu_bound']:.2f}  (CPU bound "
                                                    f"{cpu_bound:.0f} fps from decode {dec_cpu * 1e3:.2f} + "
                                                    f"pre+invoke {pi_cpu * 1e3:.2f} ms CPU)"),
            ("diagnostic: one / four if alone", f"{res['one_over_four_if_alone']:.2f}  (CPU per frame "
                                                f"{res['one_cpu_ms_per_frame']:.2f} vs "
                                                f"{res['four_cpu_ms_per_frame']:.2f} ms)"),
            ("one / four       (target >= 1.5)", f"{res['one_over_four']:.2f}"),
            ("RSS one / four   (target <= 0.4)", f"{res['rss_one_over_four']:.2f}"),
            ("batches of 4 / one frame per invoke", f"{res['batch_over_one']:.2f}  ({res['one_batch_batches']} "
                                                    f"batched invokes; batchable model: {batchable})"),
            (f"default threads {res['default_threads']}: one / four",
             f"{res['one_default_over_four_default']:.2f}  (RSS {res['rss_one_default_over_four_default']:.2f})"),
            ("load avg 1m before / after",
             f"{load_before:.2f} / {res['load_avg_1m_after']:.2f} ({os.cpu_count()} cpus)"),
            ("plot", str(png))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    (out_dir / "bench_multicam.json").write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="edge: one daemon with four sources against four daemons")
    ap.add_argument("--out", type=Path, default=None, help="where the videos and bench_multicam.json go")
    ap.add_argument("--frames", type=int, default=FRAMES, help="frames per source")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ns = ap.parse_args()
    if ns.out is None:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d) / "bench_multicam", ns.frames, ns.repeats)
    else:
        main(ns.out, ns.frames, ns.repeats)
