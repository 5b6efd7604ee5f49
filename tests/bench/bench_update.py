"""Update path figures: verify + stage + self-test + switch of a ~5 MB bundle (target < 2 s),
rollback warm and cold (target < 0.5 s), and frames dropped while swapping inside a running pipeline
(target 0).

The bundle is mobilenet_float (1.5 MB) plus a realistic ~3.7 MB extra file (calibration samples).
The pipeline runs like a live camera: a test pattern paced at 30 fps, ``drop_oldest`` (the policy
that drops a frame when inference falls behind: with ``block`` a zero would mean nothing), the
mobilenet model on every frame, while the updater installs and rolls back in another thread.

* install: ``UpdateService.install_bytes`` (verify, stage into the inactive slot with fsync,
  self-test on the edge runtime, persist TRIAL, flip the pointer, hot-swap);
* warm rollback: a failed trial (the previous model is still loaded: one swap + state writes);
* cold rollback: an ordered rollback after a commit (the previous model is no longer in memory: its
  slot is re-verified against the trusted keys, re-hashed and loaded from disk, then swapped);
* rollback at boot: a daemon that died during a trial starts again (``boot_model``): the rollback is
  decided, persisted and the previous slot re-verified and loaded before the first frame.

Every round: install X (trial) -> warm rollback -> install Y -> commit -> cold rollback.
Run: ``PYTHONPATH=. .venv/bin/python -m tests.bench.bench_update`` or
``.venv/bin/python -m tests.bench.run --only bench_update``.
"""

from __future__ import annotations

import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

TARGET_INSTALL_S = 2.0
TARGET_ROLLBACK_S = 0.5
ROUNDS = 3
FPS = 30.0


def _mobilenet_bundle(models_dir: Path, kp: Any, version: int) -> bytes:
    from edge.inference.runtime import load_model
    from proto.inputspec import InputSpec
    from tests.helpers.bundles import make_bundle

    path = models_dir / "mobilenet_float.tflite"
    spec = InputSpec(shape=[1, 96, 96, 3], dtype="float32")
    m = load_model(str(path), spec=spec, labels=["a", "b", "c"])
    rng = np.random.default_rng(version)
    cases = []
    for _ in range(2):
        x = rng.random(spec.shape, dtype=np.float32)
        cases.append({"input": base64.b64encode(x.tobytes()).decode(),
                      "expected": [float(v) for v in m.invoke(x)]})
    m.close()
    calib = rng.integers(0, 255, size=(38, 96, 96, 3), dtype=np.uint8).tobytes()  # ~1 MB ...
    calib = calib * 3 + calib[: len(calib) // 2]  # ~3.7 MB of calibration samples
    return make_bundle(path, kp, version=version, name="mobilenet", labels=["a", "b", "c"], spec=spec,
                       self_test={"tolerance": 0.01, "cases": cases, "latency_budget_ms": None},
                       extra_files={"calibration.bin": calib})


def main(out_dir: Path) -> Dict[str, Any]:
    from edge import config
    from edge.config import PipelineConfig, SamplerConfig, SourceConfig
    from edge.pipeline.loop import ModelHolder, Pipeline
    from edge.pipeline.sampler import Sampler
    from edge.sources import open_source
    from edge.updater import state as st
    from edge.updater.service import UpdateService
    from tests.helpers.bundles import make_keypair
    from tests.helpers.models import default_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = default_dir()
    installs: List[float] = []
    warm: List[float] = []
    cold: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        kp = make_keypair(t)
        bundles = [_mobilenet_bundle(models_dir, kp, v) for v in range(1, 2 * ROUNDS + 3)]
        size = len(bundles[0])
        cfg = config.from_dict({"device": {"id": "bench", "data_dir": str(t / "data")},
                                "model": {"threads": 1},
                                "update": {"trust_dir": str(kp.pub_path), "trial_frames": 10 ** 9,
                                           "trial_seconds": 3600.0, "trial_stall_s": 3600.0}})
        holder = ModelHolder()
        svc = UpdateService.from_config(cfg, None, holder, None)
        svc.start()
        svc.install_bytes(bundles[0])
        svc.updater.commit("bench setup")
        svc.health.end_trial()
        source = open_source(SourceConfig(kind="testpattern", fps=FPS, width=320, height=240))
        seen = [0]
        lock = threading.Lock()

        def count(_r: Any) -> None:
            with lock:
                seen[0] += 1

        def frames_pass(n: int = 10) -> None:  # let the pipeline run between swaps (like a real device)
            with lock:
                target = seen[0] + n
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with lock:
                    if seen[0] >= target:
                        return
                time.sleep(0.01)

        sampler = Sampler(SamplerConfig(max_per_minute=0, max_per_hour=0, max_per_day=0))
        pipe = Pipeline(source, holder, sampler, lambda s: None,
                        PipelineConfig(drop_policy="drop_oldest", queue_size=4),
                        observers=[svc.observe, count])
        pipe.start()
        t_start = time.monotonic()
        try:
            frames_pass(30)
            for r in range(ROUNDS):
                x, y = bundles[1 + 2 * r], bundles[2 + 2 * r]
                t0 = time.perf_counter()
                svc.install_bytes(x)  # verify + stage + self-test + switch (hot swap)
                installs.append(time.perf_counter() - t0)
                frames_pass()
                t0 = time.perf_counter()
                svc._rollback("bench: failed trial")  # warm: previous model still loaded
                warm.append(time.perf_counter() - t0)
                frames_pass()
                t0 = time.perf_counter()
                svc.install_bytes(y)
                installs.append(time.perf_counter() - t0)
                frames_pass()
                svc.updater.commit("bench")
                svc.health.end_trial()
                frames_pass()
                t0 = time.perf_counter()
                svc._rollback("bench: ordered rollback")  # cold: reload from disk
                cold.append(time.perf_counter() - t0)
                assert svc.updater.state.state == st.ROLLED_BACK
                frames_pass()
        finally:
            pipe.stop(60)
        elapsed = time.monotonic() - t_start
        svc.install_bytes(bundles[-1])  # on trial when "the daemon dies"
        svc.stop()
        trial = svc.updater.state.trial or {}
        trial["boot_count"] = int(cfg.update.max_boot_attempts)  # what a crash (no clean stop) leaves
        svc.updater.state.update(trial=trial)
        boot_svc = UpdateService.from_config(cfg, None, ModelHolder(), None)
        t0 = time.perf_counter()
        booted = boot_svc.boot_model()
        boot_rollback = time.perf_counter() - t0
        assert booted is not None and boot_svc.updater.state.state == st.ROLLED_BACK
        booted.close()
        boot_svc.stop()
    res = {
        "bundle_bytes": size,
        "install_s_median": statistics.median(installs),
        "install_s_max": max(installs),
        "install_target_s": TARGET_INSTALL_S,
        "rollback_warm_s_median": statistics.median(warm),
        "rollback_warm_s_max": max(warm),
        "rollback_cold_s_median": statistics.median(cold),
        "rollback_cold_s_max": max(cold),
        "rollback_at_boot_s": boot_rollback,
        "rollback_target_s": TARGET_ROLLBACK_S,
        "source_fps": FPS,
        "drop_policy": "drop_oldest",
        "frames_captured": pipe.captured,
        "frames_inferred": pipe.processed,
        "frames_dropped": pipe.dropped,
        "frames_lost": pipe.captured - pipe.processed,
        "inference_errors": pipe.errors,
        "achieved_fps": pipe.processed / elapsed if elapsed > 0 else 0.0,
        "swaps": len(installs) + len(warm) + len(cold),
    }
    (out_dir / "bench_update.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    out = main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/bench_update"))
    print(json.dumps(out, indent=2))
