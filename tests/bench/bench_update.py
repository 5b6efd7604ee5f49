"""Update path figures: verify + stage + self-test + switch of a ~5 MB bundle (target < 2 s),
rollback (target < 0.5 s), and frames dropped while swapping inside a running pipeline (target 0).

The bundle is mobilenet_float (1.5 MB) plus a realistic ~3.5 MB extra file (calibration samples).
Run: ``PYTHONPATH=. .venv/bin/python -m tests.bench.bench_update``.
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


def _mobilenet_bundle(models_dir: Path, kp: Any, version: int) -> bytes:
    from edge.inputspec import InputSpec
    from edge.runtime import load_model
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
    from edge.pipeline import ModelHolder, Pipeline
    from edge.sampler import Sampler
    from edge.sources import open_source
    from edge.updater.service import UpdateService
    from tests.helpers.bundles import make_keypair
    from tests.helpers.models import default_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = default_dir()
    installs: List[float] = []
    rollbacks: List[float] = []
    dropped = 0
    frames = 0
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        kp = make_keypair(t)
        bundles = [_mobilenet_bundle(models_dir, kp, v) for v in range(1, ROUNDS + 2)]
        size = len(bundles[0])
        cfg = config.from_dict({"device": {"id": "bench", "data_dir": str(t / "data")},
                                "update": {"trust_dir": str(kp.pub_path), "trial_frames": 10 ** 9,
                                           "trial_seconds": 3600.0}})
        holder = ModelHolder()
        svc = UpdateService(cfg, None, holder, None)
        svc.start()
        svc.install_bytes(bundles[0])
        svc.updater.commit("bench setup")
        svc.health.end_trial()
        source = open_source(SourceConfig(kind="testpattern", fps=0, width=320, height=240))
        seen = [0]
        lock = threading.Lock()

        def count(_r: Any) -> None:
            with lock:
                seen[0] += 1

        sampler = Sampler(SamplerConfig(max_per_minute=0, max_per_hour=0, max_per_day=0))
        pipe = Pipeline(source, holder, sampler, lambda s: None, PipelineConfig(drop_policy="block"),
                        observers=[svc.observe, count])
        pipe.start()
        try:
            for data in bundles[1:]:
                t0 = time.perf_counter()
                svc.install_bytes(data)  # verify + stage + self-test + switch (hot swap)
                installs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                svc._rollback("bench rollback", reject=False)
                rollbacks.append(time.perf_counter() - t0)
                # back onto the new one for the next round: re-install is refused as same/downgrade,
                # so the next bundle (higher version) goes over the rolled-back slot
        finally:
            pipe.stop(60)
            svc.stop()
        dropped = pipe.dropped
        frames = pipe.processed
        captured = pipe.captured
    res = {
        "bundle_bytes": size,
        "install_s_median": statistics.median(installs),
        "install_s_max": max(installs),
        "install_target_s": TARGET_INSTALL_S,
        "rollback_s_median": statistics.median(rollbacks),
        "rollback_s_max": max(rollbacks),
        "rollback_target_s": TARGET_ROLLBACK_S,
        "frames_captured": captured,
        "frames_inferred": frames,
        "frames_dropped_during_swaps": dropped + (captured - frames),
        "swaps": len(installs) + len(rollbacks),
    }
    (out_dir / "bench_update.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    out = main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/bench_update"))
    print(json.dumps(out, indent=2))
