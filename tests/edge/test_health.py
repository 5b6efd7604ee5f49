"""Trial health watch on real interpreters: bad models roll back on their own, a good one commits."""

from __future__ import annotations

import pytest

from edge.updater import state as st
from edge.updater.health import HealthWatch, TrialCriteria, p95
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
        assert dev.svc.updater.state.is_rejected("brightness", 2)
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
