"""Edge throughput benchmark: interpreter alone, a naive serial loop, the daemon end to end.

``python -m tests.bench.bench_edge [--out DIR]`` (PYTHONPATH=repo). On a camera-size (1280x720)
generated video and a MobileNetV2 int8 big enough that preprocess+invoke costs about what decoding a
frame costs (built once with TensorFlow in a subprocess and cached in the test-models dir, see
tests/bench/bench_models.py). The video is MJPG, what USB cameras deliver (see CANDIDATES):

* (a) interpreter-only invoke rate on a preprocessed tensor;
* (b) a naive serial ``read -> preprocess -> invoke`` loop (cv2.VideoCapture + Model.infer, the
  same calls the daemon makes);
* (c) the daemon itself: an in-process :class:`edge.daemon.Daemon` built from an ``edge.toml``-like
  config (a fresh data_dir per run), with its own sink: capture thread, inference, the default
  sampler, JPEG encoding of sampled frames (at the default ``max_image_side``) and the fsynced spool
  write (on the sink's two low-priority threads), and the publisher sending to a real local
  Mosquitto started by the benchmark. The rate is frames
  processed / (pipeline start -> every sampled frame in the spool); the frames acknowledged by the
  broker are reported next to it;

plus decode time and preprocess+invoke time per frame, the pipelined bound
``1/max(decode, preprocess+invoke)``, ``c/bound`` (target >= 0.95) and ``c/b`` (target >= 1.3 when
decode and inference cost about the same). The (model, texture) pair is chosen from a few candidates
so that decode time is closest to preprocess+invoke time. The interpreter runs with one thread; the
video is opened exactly as the daemon's FileSource opens it (``open_video``: FFmpeg with the source's
default ``decode_threads``, 1: decoding is one stage on one core, as the bound assumes; with FFmpeg's own
choice a helper thread decodes beside the reader, so the isolated decode time borrowed the core that
inference needs in the daemon and the "bound" was no bound). (b) and (c) runs are interleaved and each
figure is the best of ``REPEATS`` runs; the 1-minute load average before and after is recorded (the machine is shared).

The bench model has random weights, so with the default sampler *every* frame is low confidence and goes
through the near-duplicate hash (of the model's resized input, as in the daemon) until the default rate limit
(30 a minute) is full. (c) is that, over FRAMES frames (about 5 s, so the minute's budget of sampled frames
spent at the start is 12x the steady sampled load, not all of it); ``c_confident`` is the daemon with
``confidence_threshold = 0`` (no frame is low confidence, like a well-trained model on familiar scenes);
``c_every`` is a stress case, not a target: rate limits and dedup off, so *every* frame (of the first
STRESS_FRAMES) is JPEG-encoded, fsynced into the spool and published (``c_every_acked`` counts the time until
the broker acknowledged the last one). ``sampler_ms`` is the sampler's measured cost per low-confidence frame.

Two load-independent diagnostics explain a (c) below the bound on a shared or small machine: the
CPU per frame of the daemon's capture and inference threads (thread time) against the isolated
stages, and the same two stages run *side by side* on two plain threads with no daemon at all,
whose CPU per frame shows what running in parallel costs on this hardware by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np

from edge import config as edge_config
from edge.config import SamplerConfig, SourceConfig
from edge.daemon import Daemon
from edge.inference.runtime import Model, load_model
from edge.pipeline.sampler import Sampler
from edge.sources import open_capture
from tests.bench.bench_models import mobilenet_path
from tests.helpers.broker import Mosquitto

WIDTH, HEIGHT = 1280, 720
# ~5 s per daemon run. The default sampler's budget is 30 frames a minute; the bench model scores every
# frame low, so the whole minute's budget is spent at the start of each run: in 5 s that is still 12x the
# sampled load of steady operation (in the earlier 1.3 s runs it was 46x, which measured the sampler's
# burst rather than the daemon's rate). The stress case c_every reads STRESS_FRAMES of them.
FRAMES = 3000
STRESS_FRAMES = 800
CALIBRATION_FRAMES = 40
SAMPLE_FRAMES = 40  # decoded frames kept in memory to time preprocess+invoke
REPEATS = 5
MODELS = [(224, 0.35), (192, 0.35)]  # MobileNetV2 (input side, alpha)
# MJPG, what USB (UVC) cameras deliver at 720p: FFmpeg decodes it in the reading thread, so decode is one
# single-core stage. (mp4v/XVID decoding runs on FFmpeg frame threads as well, which then compete with
# inference for the same two cores and make 1/max(decode, preprocess+invoke) no bound at all.)
CANDIDATES = [("MJPG", ".avi", 0.0), ("MJPG", ".avi", 10.0), ("MJPG", ".avi", 20.0), ("MJPG", ".avi", 30.0)]


def open_video(path: Path) -> Any:
    """The video opened exactly as the daemon's FileSource opens it (same backend, same decode threads)."""
    return open_capture(str(path), SourceConfig().decode_threads)


def make_video(path: Path, n: int, fourcc: str, noise: float) -> Path:
    """A moving scene: gradients + shapes, plus ``noise`` (grey levels) of static-pattern texture."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), 30.0, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {path} with {fourcc}")
    rng = np.random.default_rng(0)
    small = rng.normal(0, 1, (HEIGHT // 4, WIDTH // 4, 3)).astype(np.float32)
    tex = cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    for i in range(n):
        base = 128 + 60 * np.sin((xx + 4 * i) / 50.0)[..., None] * np.cos((yy - 3 * i) / 70.0)[..., None]
        img = base + noise * np.roll(tex, 3 * i, axis=1)
        frame = np.clip(img, 0, 255).astype(np.uint8)
        cv2.circle(frame, ((7 * i) % WIDTH, HEIGHT // 2), 40, (20, 200, 240), -1)
        writer.write(frame)
    writer.release()
    return path


CPU: Dict[str, float] = {}  # CPU seconds per frame of the isolated stages (thread time), best run


def decode_time(path: Path, repeats: int = REPEATS) -> Tuple[float, List[np.ndarray]]:
    """Seconds per decoded frame (best of ``repeats``) and the first SAMPLE_FRAMES frames."""
    best = float("inf")
    sample: List[np.ndarray] = []
    for _ in range(repeats):
        cap = open_video(path)
        n = 0
        t0, c0 = time.perf_counter(), time.thread_time()
        while True:
            ok, f = cap.read()
            if not ok:
                break
            n += 1
            if len(sample) < SAMPLE_FRAMES:
                sample.append(f)
        dt = time.perf_counter() - t0
        CPU["decode"] = min(CPU.get("decode", 1e9), (time.thread_time() - c0) / max(1, n))
        cap.release()
        best = min(best, dt / max(1, n))
    return best, sample


def pre_invoke_time(model: Model, frames: List[np.ndarray], passes: int = 5) -> float:
    """Seconds per Model.infer (preprocess + invoke) on decoded camera frames, best of REPEATS."""
    for f in frames[:5]:
        model.infer(f)
    best = float("inf")
    for _ in range(REPEATS):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(passes):
            for f in frames:
                model.infer(f)
        best = min(best, (time.perf_counter() - t0) / (passes * len(frames)))
        CPU["pre_invoke"] = min(CPU.get("pre_invoke", 1e9), (time.thread_time() - c0) / (passes * len(frames)))
    return best


def stages_side_by_side(model: Model, path: Path, frames: List[np.ndarray]) -> Dict[str, float]:
    """CPU ms per frame of decoding and of preprocess+invoke when both run at the same time on two
    independent threads (no queue, no daemon): what running in parallel costs on this machine by
    itself (shared caches and memory bandwidth, a busy neighbour vCPU). Best of REPEATS."""
    best = {"decode": 1e9, "pre_invoke": 1e9}

    def decode() -> None:
        cap = open_video(path)
        c0, n = time.thread_time(), 0
        while cap.read()[0]:
            n += 1
        cap.release()
        best["decode"] = min(best["decode"], (time.thread_time() - c0) * 1e3 / max(1, n))

    def infer() -> None:
        c0 = time.thread_time()
        for f in frames * 5:
            model.infer(f)
        best["pre_invoke"] = min(best["pre_invoke"], (time.thread_time() - c0) * 1e3 / (5 * len(frames)))

    for _ in range(REPEATS):
        threads = [threading.Thread(target=decode), threading.Thread(target=infer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return best


def invoke_rate(model: Model, frame: np.ndarray, n: int) -> float:
    x = model.preprocess(frame)
    for _ in range(10):
        model.invoke(x)
    best = 0.0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(n):
            model.invoke(x)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def naive_once(model: Model, path: Path) -> Tuple[float, float]:
    """(frames/s, CPU ms per frame over all threads of this process)."""
    cap = open_video(path)
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        ok, f = cap.read()
        if not ok:
            break
        model.infer(f)
        n += 1
    rate = n / (time.perf_counter() - t0)
    cpu = (time.process_time() - c0) * 1e3 / max(1, n)
    cap.release()
    return rate, cpu


SAMPLERS: Dict[str, Dict[str, Any]] = {
    "c": {},                                                  # the default sampler
    "c_confident": {"confidence_threshold": 0.0},             # nothing is low confidence
    "c_every": {"max_per_minute": 0, "max_per_hour": 0, "max_per_day": 0, "dedup_distance": -1},
}


def daemon_once(model_path: Path, video: Path, broker: Mosquitto, work: Path, sampler: Dict[str, Any],
                max_frames: int = 0) -> Tuple[float, float, Dict[str, Any]]:
    """(frames/s, CPU ms per frame over all threads of this process, counters) of one daemon run."""
    data = work / "daemon-data"
    shutil.rmtree(data, ignore_errors=True)  # a fresh spool and rate-limit memory per run
    cfg = edge_config.from_dict({
        "device": {"id": "bench-edge", "data_dir": str(data), "log_level": "WARNING"},
        "source": {"kind": "file", "uri": str(video), "name": "bench", "max_frames": max_frames},
        "model": {"path": str(model_path), "threads": 1},
        "sampler": sampler,
        "mqtt": {"host": broker.host, "port": broker.port},
        "telemetry": {"interval_s": 0, "metrics_port": 0},
        "update": {"enabled": False},
    })
    daemon = Daemon(cfg)
    c0 = time.process_time()
    code = daemon.run()
    cpu = time.process_time() - c0
    p, pub = daemon.pipeline, daemon.publisher
    if code != 0 or p is None or p.errors or daemon.sink_worker.errors:
        raise RuntimeError(f"the daemon run failed (exit {code})")
    # the run ends when inference finished and the last sampled frame was stored (not when the
    # daemon's main thread, polling, noticed); "acked" when the broker acknowledged the last frame
    run_s = daemon.run_seconds()
    acked_s = pub.last_ack_at - p.started_at if pub.last_ack_at and not pub.spool_stats()[1] else 0.0
    info = {"processed": p.processed, "dropped": p.dropped, "sampled": daemon.stats.sampled,
            "spooled": daemon.sink_worker.spooled, "acked": pub.frames_acked,
            "spool_left": pub.spool_stats()[1], "run_s": run_s,
            "acked_fps": p.processed / acked_s if acked_s else 0.0,
            "capture_cpu_ms": p.capture_cpu_s * 1e3 / max(1, p.captured),
            "inference_cpu_ms": p.inference_cpu_s * 1e3 / max(1, p.processed)}
    return p.processed / run_s, cpu * 1e3 / max(1, p.processed), info


def sampler_cost(model: Model, frames: List[np.ndarray]) -> float:
    """Seconds per Sampler.decide with the default config on this model's (low-confidence) scores."""
    sampler = Sampler(SamplerConfig())
    total = 0.0
    for f in frames:
        sc = model.infer(f)
        thumb = model.last_resized  # what the pipeline hands the sampler to hash
        t0 = time.perf_counter()
        sampler.decide(sc, f, thumbnail=thumb)
        total += time.perf_counter() - t0
    return total / len(frames)


def serial_and_daemon(model: Model, model_path: Path, path: Path, work: Path) -> Dict[str, Any]:
    """(b) and the daemon runs, interleaved so all see the same machine load; best of REPEATS each."""
    runs: Dict[str, List[float]] = {"b": [], **{k: [] for k in SAMPLERS}}
    cpu: Dict[str, List[float]] = {k: [] for k in runs}
    info: Dict[str, Dict[str, Any]] = {}
    broker = Mosquitto(work / "mosquitto").start()
    try:
        for _ in range(REPEATS):
            rate, ms = naive_once(model, path)
            runs["b"].append(rate)
            cpu["b"].append(ms)
            for key, smp in SAMPLERS.items():
                rate, ms, i = daemon_once(model_path, path, broker, work, smp,
                                          STRESS_FRAMES if key == "c_every" else 0)
                if not runs[key] or rate > max(runs[key]):
                    info[key] = i
                runs[key].append(rate)
                cpu[key].append(ms)
    finally:
        broker.stop()
    return {"runs": runs, "info": info, "cpu_ms_per_frame": {k: min(v) for k, v in cpu.items()},
            **{k: max(v) for k, v in runs.items()}}


def calibrate(work: Path) -> Dict[str, Any]:
    """Pick the (model, video) pair whose decode time is closest to its preprocess+invoke time."""
    trials: List[Dict[str, Any]] = []
    for fourcc, ext, noise in CANDIDATES:
        p = work / f"cal_{fourcc}_{int(noise)}{ext}"
        try:
            make_video(p, CALIBRATION_FRAMES, fourcc, noise)
        except RuntimeError:
            continue
        dec, frames = decode_time(p, repeats=3)
        if not frames:
            continue
        for size, alpha in MODELS:
            model = load_model(mobilenet_path(size, alpha), threads=1)
            pi = pre_invoke_time(model, frames[:20], passes=2)
            model.close()
            trials.append({"fourcc": fourcc, "ext": ext, "noise": noise, "size": size, "alpha": alpha,
                           "decode_ms": dec * 1e3, "pre_invoke_ms": pi * 1e3, "ratio": dec / pi})
    if not trials:
        raise RuntimeError("no video codec could be written")
    best = min(trials, key=lambda t: abs(math.log(float(t["ratio"]))))
    return {"chosen": best, "trials": trials}


def main(out_dir: Path) -> Dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("edge").setLevel(logging.WARNING)  # the daemon's INFO lines are not the benchmark
    load_before = os.getloadavg()[0]
    cal = calibrate(out_dir)
    c = cal["chosen"]
    mname = f"MobileNetV2 int8 {c['size']}x{c['size']} alpha {c['alpha']:g} (uint8, random weights)"
    model_path = mobilenet_path(c["size"], c["alpha"])
    model = load_model(model_path, threads=1, name="bench_mnv2")
    video = make_video(out_dir / f"bench_{WIDTH}x{HEIGHT}{c['ext']}", FRAMES, c["fourcc"], c["noise"])
    CPU.clear()  # the calibration filled it with other videos and models
    decode_s, frames = decode_time(video)
    pi_s = pre_invoke_time(model, frames)
    a = invoke_rate(model, frames[0], 300)
    side = stages_side_by_side(model, video, frames)
    r = serial_and_daemon(model, model_path, video, out_dir)
    samp = sampler_cost(model, frames)
    b, cr, cc, ce = r["b"], r["c"], r["c_confident"], r["c_every"]
    bound = 1.0 / max(decode_s, pi_s)
    res: Dict[str, Any] = {
        "model": mname, "runtime": model.runtime, "threads": 1,
        "video": f"{WIDTH}x{HEIGHT} {c['fourcc']} noise={c['noise']:g}, {FRAMES} frames",
        "decode_ms": decode_s * 1e3, "preprocess_invoke_ms": pi_s * 1e3, "sampler_ms": samp * 1e3,
        "a_invoke_fps": a, "b_naive_fps": b, "c_daemon_fps": cr, "c_confident_fps": cc, "c_every_fps": ce,
        "bound_fps": bound, "c_over_bound": cr / bound, "c_over_b": cr / b,
        "c_confident_over_bound": cc / bound, "c_confident_over_b": cc / b,
        "c_every_over_bound": ce / bound, "c_every_acked_fps": r["info"]["c_every"]["acked_fps"],
        # load-independent diagnostic: CPU per frame of the daemon's two threads against the isolated stages
        "decode_cpu_ms": CPU["decode"] * 1e3, "pre_invoke_cpu_ms": CPU["pre_invoke"] * 1e3,
        "c_thread_cpu_ms": {"capture": r["info"]["c"]["capture_cpu_ms"],
                            "inference": r["info"]["c"]["inference_cpu_ms"]},
        "c_cpu_over_bound": max(CPU["decode"], CPU["pre_invoke"]) * 1e3 / max(
            r["info"]["c"]["capture_cpu_ms"], r["info"]["c"]["inference_cpu_ms"]),
        "side_by_side_cpu_ms": side,
        "side_by_side_over_bound": max(CPU["decode"], CPU["pre_invoke"]) * 1e3 / max(side.values()),
        "cpu_ms_per_frame": r["cpu_ms_per_frame"], "runs": r["runs"], "repeats": REPEATS,
        "daemon": r["info"], "calibration": cal["trials"],
        "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
    }
    model.close()

    def runs(key: str) -> str:
        return ", ".join(f"{x:.0f}" for x in r["runs"][key])

    rows = [("model", mname), ("video", res["video"]), ("runtime", f"{model.runtime}, 1 thread"),
            ("decode / frame", f"{res['decode_ms']:.2f} ms"),
            ("preprocess+invoke / frame", f"{res['preprocess_invoke_ms']:.2f} ms"),
            ("sampler / low-confidence frame", f"{res['sampler_ms']:.2f} ms"),
            ("(a) interpreter invoke only", f"{a:8.1f} fps"),
            ("(b) naive serial loop", f"{b:8.1f} fps  (runs: {runs('b')})"),
            ("(c) daemon end to end (MQTT, spool)", f"{cr:8.1f} fps  (runs: {runs('c')}; "
                                                    f"{r['info']['c']['sampled']} sampled, "
                                                    f"{r['info']['c']['acked']} acked)"),
            ("(c) confident: no low-conf frames", f"{cc:8.1f} fps  (runs: {runs('c_confident')})"),
            ("stress: every frame sent", f"{ce:8.1f} fps  (runs: {runs('c_every')}; "
                                         f"{r['info']['c_every']['sampled']} JPEG+spool+publish, "
                                         f"{res['c_every_acked_fps']:.1f} fps until the last PUBACK)"),
            ("CPU / frame, all threads: b, c, conf, every", ", ".join(
                f"{r['cpu_ms_per_frame'][k]:.2f}" for k in ("b", "c", "c_confident", "c_every")) + " ms"),
            ("pipelined bound 1/max(dec, pre+inv)", f"{bound:8.1f} fps"),
            ("c / bound  (target >= 0.95)", f"{res['c_over_bound']:.2f}  (confident: "
                                            f"{res['c_confident_over_bound']:.2f})"),
            ("c / b      (target >= 1.3)", f"{res['c_over_b']:.2f}  (confident: {res['c_confident_over_b']:.2f})"),
            ("stress c_every / bound  (no target)", f"{res['c_every_over_bound']:.2f}"),
            ("CPU/frame: (c) capture, inference thread", f"{res['c_thread_cpu_ms']['capture']:.2f}, "
                                                        f"{res['c_thread_cpu_ms']['inference']:.2f} ms  (isolated "
                                                        f"decode {res['decode_cpu_ms']:.2f}, pre+invoke "
                                                        f"{res['pre_invoke_cpu_ms']:.2f})"),
            ("stages side by side, no daemon: CPU/frame", f"{side['decode']:.2f}, {side['pre_invoke']:.2f} ms  "
                                                          f"(ceiling {res['side_by_side_over_bound']:.2f} x bound: "
                                                          "the cost of running in parallel here)"),
            ("(c) if each thread had a core: / bound", f"{res['c_cpu_over_bound']:.2f}  (diagnostic: the "
                                                      "daemon's CPU per frame, without the machine's load)"),
            ("load avg 1m before / after", f"{load_before:.2f} / {res['load_avg_1m_after']:.2f} "
                                           f"({os.cpu_count()} cpus)")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    (out_dir / "bench_edge.json").write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="edge throughput benchmark")
    ap.add_argument("--out", type=Path, default=None, help="where the video and bench_edge.json go")
    ns = ap.parse_args()
    if ns.out is None:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
    else:
        main(ns.out)
