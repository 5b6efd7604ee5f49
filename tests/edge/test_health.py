"""Trial health watch on real interpreters: bad models roll back on their own, a good one commits."""

from __future__ import annotations

import pytest

from edge.updater import state as st
from edge.updater.health import HealthWatch, TrialCriteria, p95
from proto.inputspec import InputSpec
from tests.edge.test_updater import Device, bundle, make_cfg
from tests.helpers.bundles import make_keypair


@pytest.fixture
def kp(tmp_path):  # noqa: ANN001
    return make_keypair(tmp_path)


def _device_on_v1(tmp_path, kp, models_dir, **update) -> Device:  # noqa: ANN001, ANN003
    dev = Device(make_cfg(tmp_path, kp.pub_path, **update))
    assert dev.install(bundle(models_dir, kp, 1))
    assert dev.settle() == st.COMMITTED
    dev.baseline(30)  # the previous model's latency and confidence, measured before the switch
    return dev


def test_always_low_confidence_model_rolled_back(tmp_path, kp, models_dir):  # noqa: ANN001
    dev = _device_on_v1(tmp_path, kp, models_dir, trial_frames=10, trial_max_low_conf_rate=0.5,
                         trial_max_latency_ratio=50.0)
    try:
        assert dev.install(bundle(models_dir, kp, 2, model="uniform_int8"))
        assert dev.version == 2
        assert dev.settle() == st.ROLLED_BACK
        assert dev.version == 1  # hot-swapped back
        snap = dev.svc.updater.state.snapshot()
        assert "low-confidence" in snap["reason"]
        assert dev.svc.updater.slots.active().version == 1
        assert dev.svc.updater.state.floor("brightness") == 2  # never installed again
    finally:
        dev.close()


def test_slow_model_rolled_back_for_latency(tmp_path, kp, models_dir):  # noqa: ANN001
    dev = _device_on_v1(tmp_path, kp, models_dir, trial_frames=5, trial_max_latency_ratio=2.0,
                         trial_latency_floor_ms=0.05)
    try:
        assert dev.install(bundle(models_dir, kp, 2, model="slow_int8"))
        assert dev.settle() == st.ROLLED_BACK
        assert dev.version == 1
        assert "latency" in dev.svc.updater.state.snapshot()["reason"]
    finally:
        dev.close()


def test_good_model_committed(tmp_path, kp, models_dir):  # noqa: ANN001
    dev = _device_on_v1(tmp_path, kp, models_dir, trial_frames=10, trial_max_latency_ratio=50.0)
    try:
        assert dev.install(bundle(models_dir, kp, 2))
        assert dev.settle() == st.COMMITTED
        assert dev.version == 2
        vm = dev.svc.version_manifest()
        assert (vm.installed.version, vm.previous.version) == (2, 1)
    finally:
        dev.close()


class _R:
    def __init__(self, ref, latency=0.01, low=False, error=None):  # noqa: ANN001
        self.model_ref, self.latency_s, self.low_confidence, self.error = ref, latency, low, error


def test_invoke_errors_fail_the_trial_and_old_frames_do_not_count():
    w = HealthWatch(TrialCriteria(frames=100, seconds=0, max_errors=3))
    for _ in range(10):
        w.observe(_R("old"))
    w.begin_trial("new", w.baseline())
    assert w.observe(_R("old", error="boom")) is None  # a frame of the previous model in flight
    assert w.observe(_R("new", error="boom")) is None
    assert w.observe(_R("new", error="boom")) is None
    verdict = w.observe(_R("new", error="boom"))
    assert verdict is not None and verdict[0] == "rollback" and "3 invoke errors" in verdict[1]


def test_time_window_must_pass_as_well_as_frames():
    now = [0.0]
    w = HealthWatch(TrialCriteria(frames=2, seconds=10.0), clock=lambda: now[0])
    w.begin_trial("new", None)
    assert w.observe(_R("new")) is None and w.observe(_R("new")) is None
    assert w.check_time() is None
    now[0] = 11.0
    assert w.check_time() == ("commit", "healthy over 2 frames")


def test_p95():
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([]) == 0.0


# ---- without a baseline, judged at the previous threshold, non-finite scores, hung models ----------

def test_no_baseline_uses_absolute_limits(tmp_path, kp, models_dir):  # noqa: ANN001
    dev = Device(make_cfg(tmp_path, kp.pub_path, trial_frames=10))
    try:
        assert dev.install(bundle(models_dir, kp, 1, model="uniform_int8"))  # first model: no baseline
        assert dev.settle() == st.FAILED  # rolled back... to nothing: terminal, see test_update_security
        assert "low-confidence rate 100%" in dev.svc.updater.state.snapshot()["reason"]
    finally:
        dev.close()
    dev = Device(make_cfg(tmp_path / "slow", kp.pub_path, trial_frames=5, trial_max_latency_ms=0.01))
    try:
        assert dev.install(bundle(models_dir, kp, 1))
        dev.svc.updater.commit("setup")
        dev.svc.health.end_trial()
        assert dev.install(bundle(models_dir, kp, 2, model="slow_int8"))  # no frames of v1 seen: no baseline
        assert dev.settle() == st.ROLLED_BACK and dev.version == 1
        assert "absolute limit" in dev.svc.updater.state.snapshot()["reason"]
    finally:
        dev.close()


def test_new_bundle_cannot_choose_the_threshold_its_trial_is_judged_by(tmp_path, kp, models_dir):  # noqa: ANN001
    dev = _device_on_v1(tmp_path, kp, models_dir, trial_frames=10, trial_max_latency_ratio=50.0)
    try:
        # v2 says nothing is ever low confidence (threshold 0): the pipeline's flag follows it...
        assert dev.install(bundle(models_dir, kp, 2, model="uniform_int8", default_threshold=0.0))
        seq = [0]

        def step():  # noqa: ANN202
            from tests.edge.test_updater import infer_once

            seq[0] += 1
            infer_once(dev.svc, dev.holder, seq[0], threshold=0.0)  # ... so every frame comes flagged "confident"
            s = dev.svc.updater.state.state
            return s if s in (st.COMMITTED, st.ROLLED_BACK) else None

        from tests.helpers.wait import wait_for

        assert wait_for(step, 60, interval=0.001, what="trial verdict") == st.ROLLED_BACK
        assert "threshold 0.6" in dev.svc.updater.state.snapshot()["reason"]  # v1's default judged it
    finally:
        dev.close()


def test_non_finite_scores_count_as_errors():
    """Results built outside the pipeline (which makes them error results itself, see test_pipeline)."""
    import numpy as np

    from edge.pipeline.loop import InferenceResult

    w = HealthWatch(TrialCriteria(frames=100, seconds=0, max_errors=2))
    w.begin_trial("new", None)
    assert w.observe(InferenceResult(1, "new", np.array([0.1, float("nan"), 0.2]), 0.01, None, False, [])) is None
    verdict = w.observe(InferenceResult(2, "new", np.array([float("inf"), 0.0, 0.0]), 0.01, None, False, []))
    assert verdict is not None and verdict[0] == "rollback" and "non-finite" in verdict[1]


NAN_SPEC = InputSpec(shape=[1, 64, 64, 3], dtype="float32")  # nan_float.tflite (tests/helpers/models.py)


def _nan_bundle(models_dir, kp, version: int, cases: list) -> bytes:  # noqa: ANN001
    return bundle(models_dir, kp, version, model="nan_float", spec=NAN_SPEC,
                  self_test={"tolerance": 0.05, "cases": cases, "latency_budget_ms": None})


def test_self_test_fails_on_non_finite_scores(tmp_path, kp, models_dir):  # noqa: ANN001
    """A real model whose scores are NaN (NaN dense weights) fails its self-test on the edge runtime,
    before any switch: the install is refused and the running model stays."""
    import base64

    import numpy as np

    from edge.inference.runtime import load_model
    from edge.updater.selftest import SelfTestError, run_self_test
    from proto.errors import KestrelError

    x = np.full(NAN_SPEC.shape, 0.9, np.float32)
    case = {"input": base64.b64encode(x.tobytes()).decode(), "expected": [1 / 3] * 3}
    m = load_model(str(models_dir / "nan_float.tflite"), spec=NAN_SPEC, labels=["bright", "dark", "mid"])
    try:
        assert np.isnan(m.invoke(x)).all()
        with pytest.raises(SelfTestError, match="non-finite"):
            run_self_test(m, {"tolerance": 0.05, "cases": [case], "latency_budget_ms": None},
                          latency_budget_ms=1000.0)
    finally:
        m.close()
    dev = _device_on_v1(tmp_path, kp, models_dir)
    try:
        with pytest.raises(KestrelError, match="non-finite"):
            dev.install(_nan_bundle(models_dir, kp, 2, [case]))
        assert dev.version == 1 and dev.svc.updater.slots.active().version == 1
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.FAILED and "self-test failed" in snap["reason"]
        assert dev.svc.updater.state.is_rejected("brightness", 2)
    finally:
        dev.close()


def test_nan_model_on_trial_in_the_pipeline_is_rolled_back(tmp_path, kp, models_dir):  # noqa: ANN001
    """A NaN model that gets past the self-test (a device that asks for no cases) is switched to; the
    pipeline turns its NaN scores into error results (never a confident frame for the sampler) and the
    trial rolls it back after ``trial_max_errors``."""
    import threading

    from edge.config import PipelineConfig, SamplerConfig, SourceConfig
    from edge.pipeline.loop import NON_FINITE, Pipeline
    from edge.pipeline.sampler import Sampler
    from edge.sources import open_source
    from tests.helpers.wait import wait_for

    dev = _device_on_v1(tmp_path, kp, models_dir, self_test_min_cases=0, trial_frames=20, trial_max_errors=3,
                        trial_max_latency_ratio=50.0)
    results: list = []
    lock = threading.Lock()

    def record(r) -> None:  # noqa: ANN001
        with lock:
            results.append(r)

    source = open_source(SourceConfig(kind="testpattern", fps=30.0, width=64, height=48,
                                      pattern_brightness=[0.9]))
    sampler = Sampler(SamplerConfig(max_per_minute=1000, max_per_hour=1000, max_per_day=1000))
    sampled: list = []
    pipe = Pipeline(source, dev.holder, sampler, sampled.append, PipelineConfig(queue_size=30),
                    observers=[dev.svc.observe, record])
    pipe.start()
    try:
        assert dev.install(_nan_bundle(models_dir, kp, 2, []))
        wait_for(lambda: dev.svc.updater.state.state == st.ROLLED_BACK, 30, what="the NaN model rolled back")
        n = len(results)
        wait_for(lambda: len(results) >= n + 5, 30, what="frames after the rollback")
    finally:
        assert pipe.stop(30)
        dev.close()
    on_v2 = [r for r in results if r.model_ref is not None and r.model_ref.version == 2]
    assert len(on_v2) >= 3 and all(r.error == NON_FINITE and r.scores is None for r in on_v2)
    assert pipe.error_kinds.get("non_finite_scores", 0) == len(on_v2)
    assert all(s.model_ref.version == 1 for s in sampled)  # no NaN frame ever reached the sink
    assert results[-1].model_ref.version == 1 and results[-1].error is None
    snap = dev.svc.updater.state.snapshot()
    assert "invoke errors" in snap["reason"] and NON_FINITE in snap["reason"]
    assert dev.svc.updater.state.floor("brightness") == 2


def test_stall_detector_needs_arriving_frames():
    now = [0.0]
    w = HealthWatch(TrialCriteria(frames=5, seconds=0, stall_s=10.0), clock=lambda: now[0])
    w.begin_trial("new", None)
    assert w.check_progress(100, 50) is None
    now[0] = 20.0
    assert w.check_progress(100, 50) is None  # no frames arrived: the camera, not the model
    now[0] = 25.0
    assert w.check_progress(130, 50) is None  # frames arrive again; the clock starts now
    now[0] = 36.0
    verdict = w.check_progress(160, 50)
    assert verdict is not None and verdict[0] == "rollback" and "stalled" in verdict[1] and w.stalled


def test_hung_trial_model_rolled_back_and_daemon_told_to_restart(tmp_path, kp, models_dir):  # noqa: ANN001
    from tests.helpers.wait import wait_for

    dev = _device_on_v1(tmp_path, kp, models_dir, trial_frames=10, trial_stall_s=0.3)
    stalls = []
    counters = [1000, 500]

    def progress():  # noqa: ANN202
        counters[0] += 1  # the camera keeps delivering; the inference thread is stuck (processed frozen)
        return counters[0], counters[1], False

    dev.svc.attach_pipeline(progress, on_stall=stalls.append)
    try:
        assert dev.install(bundle(models_dir, kp, 2))
        assert dev.version == 2
        # the rollback is persisted first, then the daemon is told (on_stall): wait for both
        wait_for(lambda: dev.svc.updater.state.state == st.ROLLED_BACK and stalls, 30, what="stall rollback")
        assert dev.version == 1 and len(stalls) == 1 and "stalled" in stalls[0]
        assert dev.svc.updater.state.floor("brightness") == 2  # never installed again
    finally:
        dev.svc._progress = None  # the fake pipeline is not "done": let stop() close the models
        dev.close()
