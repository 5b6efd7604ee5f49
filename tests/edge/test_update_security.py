"""The update path against an attacker who can replay bundles, publish desired-state messages or
serve bytes: replay after rollback, cross-model bundles, redirected/oversized downloads, rollbacks
to the wrong slot, stale fleet rollbacks, revoked keys, clock games. Real interpreters, real
signed bundles, a real gRPC registry; desired-state messages are fed to the worker's handler
directly (the MQTT leg is covered in test_updater)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.pipeline.loop import InferenceResult
from edge.updater import state as st
from edge.updater.engine import NoRollbackTarget, Updater
from edge.updater.slots import SlotError
from proto import kestrel_pb2
from proto.errors import BundleError
from proto.hubcreds import Credentials
from tests.edge.test_updater import BRIGHT, Device, _Registry, bundle, frame, make_cfg
from tests.helpers.bundles import make_keypair
from tests.helpers.wait import wait_for

PLAIN = Credentials(plaintext=True)  # the test registries' plain-text loopback port


def desired(name: str, version: int, data: bytes = b"", **kw: Any) -> Any:
    return kestrel_pb2.DesiredState(model_name=name, version=version, issued_ms=int(time.time() * 1000),
                                    sha256=hashlib.sha256(data).hexdigest() if data else "", size=len(data),
                                    **kw)


def on_v1_v2(dev: Device, models_dir: Path, kp: Any) -> None:
    """Two committed versions: v2 active, v1 in the other slot."""
    for v in (1, 2):
        assert dev.install(bundle(models_dir, kp, v))
        assert dev.settle() == st.COMMITTED
        dev.baseline()


def active(dev: Device) -> Any:
    return dev.svc.updater.slots.active()


# ---- replay and cross-model -------------------------------------------------------------------

def test_replay_after_rollback_is_refused_on_every_path(device, kp, models_dir):  # noqa: ANN001
    v2 = bundle(models_dir, kp, 2)
    reg = _Registry({("brightness", 2): v2})
    try:
        dev = device(hub_grpc=reg.target)
        on_v1_v2(dev, models_dir, kp)
        dev.svc.desired._fleet_rollback(desired("brightness", 0, rollback=True, rollback_from_version=2))
        assert dev.version == 1 and active(dev).version == 1
        assert dev.svc.updater.state.floor("brightness") == 2  # the high-water mark is not lowered
        # the hub path: a (forged or stale) desired state asking for v2 again fetches nothing
        n = len(reg.requests)
        dev.svc.desired.on_desired_state(desired("brightness", 2, v2))
        assert len(reg.requests) == n and dev.version == 1
        # the verifier itself: v2 is at the floor -> downgrade (not "newer than the installed v1")
        with pytest.raises(BundleError) as ei:
            dev.svc.updater.verify(v2)
        assert ei.value.reason == "downgrade" and "highest version" in str(ei.value)
        # an operator's install of the same bytes is refused too; the model is untouched
        with pytest.raises(BundleError):
            dev.install(v2)
        assert dev.version == 1 and active(dev).version == 1
        assert dev.install(bundle(models_dir, kp, 3))  # moving forward still works
        assert dev.version == 3
    finally:
        reg.stop()


def test_desired_state_for_another_model_or_served_mismatch_is_refused(device, kp, models_dir):  # noqa: ANN001
    other = bundle(models_dir, kp, 50, name="some-other-model")
    v1 = bundle(models_dir, kp, 1)
    reg = _Registry({("some-other-model", 50): other, ("brightness", 7): other, ("brightness", 8): v1})
    try:
        dev = device(hub_grpc=reg.target)
        assert dev.install(bundle(models_dir, kp, 1)) and dev.settle() == st.COMMITTED
        dev.svc.desired.on_desired_state(desired("some-other-model", 50, other))
        assert reg.requests == [] and dev.version == 1  # refused before any download
        # the hub (or whoever answers) serves another model's bundle under the announced name
        dev.svc.desired.on_desired_state(desired("brightness", 7, other))
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.FAILED and "wrong_model" in snap["reason"], snap["reason"]
        # ... or an older bundle of the right model under a newer announced version
        dev.svc.desired.on_desired_state(desired("brightness", 8, v1))
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.FAILED and "not_desired" in snap["reason"], snap["reason"]
        assert dev.version == 1 and active(dev).version == 1
        assert not list((dev.cfg.data_dir / "downloads").glob("*.part"))
    finally:
        reg.stop()


def test_announced_version_must_match_the_signed_manifest(device, kp, models_dir):  # noqa: ANN001
    v3 = bundle(models_dir, kp, 3)
    reg = _Registry({("brightness", 9): v3})
    try:
        dev = device(hub_grpc=reg.target)
        assert dev.install(bundle(models_dir, kp, 1)) and dev.settle() == st.COMMITTED
        dev.svc.desired.on_desired_state(desired("brightness", 9, v3))
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.FAILED and "not_desired" in snap["reason"], snap["reason"]
        assert dev.version == 1
    finally:
        reg.stop()


def test_grpc_target_of_a_desired_state_is_used_only_when_configured(device, kp, models_dir):  # noqa: ANN001
    v2 = bundle(models_dir, kp, 2)
    hub, evil = _Registry({("brightness", 2): v2}), _Registry({("brightness", 2): v2})
    try:
        dev = device(hub_grpc=hub.target)
        assert dev.install(bundle(models_dir, kp, 1)) and dev.settle() == st.COMMITTED
        dev.baseline()
        dev.svc.desired.on_desired_state(desired("brightness", 2, v2, grpc_target=evil.target))
        assert evil.requests == [] and [r[:2] for r in hub.requests] == [("brightness", 2)]
        assert dev.version == 2
    finally:
        hub.stop()
        evil.stop()


# ---- downloads --------------------------------------------------------------------------------

class _Liar(_Registry):
    """Streams more bytes than any limit, announcing no size at all."""

    def __init__(self, n: int) -> None:
        super().__init__({})
        from concurrent import futures

        import grpc

        from proto import kestrel_pb2_grpc

        self.server.stop(0)
        outer = self

        class Servicer(kestrel_pb2_grpc.ModelRegistryServicer):
            def FetchModel(self, request, context):  # noqa: ANN001, N802, ANN202
                outer.requests.append((request.model_name, request.version, request.offset))
                off = int(request.offset)
                while off < n:
                    yield kestrel_pb2.FetchChunk(data=b"\0" * 65536, offset=off)
                    off += 65536

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        kestrel_pb2_grpc.add_ModelRegistryServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_download_without_announced_size_is_bounded_on_every_chunk(tmp_path):  # noqa: ANN001
    from edge.updater import fetch

    liar = _Liar(3 * 1024 * 1024)
    try:
        with pytest.raises(BundleError) as ei:
            fetch.fetch_bundle(liar.target, "brightness", 2, downloads=tmp_path / "dl", max_bundle_bytes=100_000,
                               creds=PLAIN)
        assert ei.value.reason == "too_large"
        assert not fetch.part_path(tmp_path / "dl", "brightness", 2).exists()  # nothing left behind
    finally:
        liar.stop()


def test_stale_part_file_is_refetched_not_rejected(tmp_path, kp, models_dir):  # noqa: ANN001
    from edge.updater import fetch

    data = bundle(models_dir, kp, 2)
    reg = _Registry({("brightness", 2): data})
    try:
        part = fetch.part_path(tmp_path / "dl", "brightness", 2)
        part.parent.mkdir(parents=True)
        stale = b"an earlier build of the same version" * 10  # then the version was re-signed
        part.write_bytes(stale)
        got = fetch.fetch_bundle(reg.target, "brightness", 2, downloads=tmp_path / "dl",
                                 sha256=hashlib.sha256(data).hexdigest(), max_bundle_bytes=10 ** 8, creds=PLAIN)
        assert got.read_bytes() == data
        assert [r[2] for r in reg.requests] == [len(stale), 0]  # resumed, mismatched, fetched afresh
    finally:
        reg.stop()


def test_download_write_error_ends_in_failed_state(device, kp, models_dir):  # noqa: ANN001
    v2 = bundle(models_dir, kp, 2)
    reg = _Registry({("brightness", 2): v2})
    try:
        dev = device(hub_grpc=reg.target)
        assert dev.install(bundle(models_dir, kp, 1)) and dev.settle() == st.COMMITTED
        dl = dev.cfg.data_dir / "downloads"
        dl.write_text("a file where the downloads directory should be")
        dev.svc.desired.on_desired_state(desired("brightness", 2, v2))
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.FAILED and "download failed" in snap["reason"]
        assert not dev.svc.updater.state.is_rejected("brightness", 2)  # a local problem: retried later
        assert dev.version == 1
    finally:
        reg.stop()


# ---- rollback targets -------------------------------------------------------------------------

def test_second_rollback_never_switches_forward_to_the_rejected_model(device, kp, models_dir):  # noqa: ANN001
    dev = device()
    on_v1_v2(dev, models_dir, kp)
    dev.svc._rollback("test")
    assert dev.version == 1
    with pytest.raises(NoRollbackTarget) as ei:
        dev.svc._rollback("again")
    assert "never committed" in str(ei.value)
    assert dev.version == 1 and active(dev).version == 1
    assert dev.svc.updater.state.state == st.ROLLED_BACK
    assert not dev.svc.updater.state.is_rejected("brightness", 1)  # the good model was not marked bad
    vm = dev.svc.version_manifest()
    assert vm.installed.version == 1 and not vm.HasField("previous")


def test_failed_self_test_slot_is_never_a_rollback_target(device, kp, models_dir, tmp_path):  # noqa: ANN001
    from edge.cli import update as updatecmd

    dev = device()
    assert dev.install(bundle(models_dir, kp, 1)) and dev.settle() == st.COMMITTED
    st_bad = {"tolerance": 0.01, "latency_budget_ms": None,
              "cases": [{"input": np.zeros((1, 64, 64, 3), np.uint8).tobytes(), "expected": [0.0, 0.0, 1.0]}]}
    from edge.updater.selftest import SelfTestError

    with pytest.raises(SelfTestError):
        dev.install(bundle(models_dir, kp, 2, self_test=st_bad))
    assert dev.svc.updater.slots.inactive().version == 2  # the failed model sits in the other slot
    assert dev.svc.version_manifest().previous.version == 0  # ... and is not reported as "previous"
    dev.close()
    cfgp = tmp_path / "edge.toml"
    cfgp.write_text(f'[device]\nid = "dev1"\ndata_dir = "{tmp_path / "data"}"\n'
                    f'[update]\ntrust_dir = "{kp.pub_path}"\n')
    assert updatecmd.main(["rollback", "--config", str(cfgp)]) == 2
    assert Updater.from_config(dev.cfg).slots.active().version == 1


def test_selftest_requires_cases_and_caps_tolerance_and_budget(device, kp, models_dir, tmp_path):  # noqa: ANN001
    from edge.updater.selftest import SelfTestError

    dev = device()
    with pytest.raises(SelfTestError, match="at least 1"):
        dev.install(bundle(models_dir, kp, 1, self_test={"tolerance": 0.05, "cases": [],
                                                         "latency_budget_ms": None}))
    good = bundle(models_dir, kp, 1)
    cases = json.loads(_manifest(good))["self_test"]["cases"]
    for c in cases:  # every expected score off by 0.5: a bundle asking for tolerance 1.0 must still fail
        c["expected"] = [min(1.0, x + 0.5) for x in c["expected"]]
    with pytest.raises(SelfTestError, match="tolerance 0.1"):
        dev.install(bundle(models_dir, kp, 1, self_test={"tolerance": 1.0, "cases": cases,
                                                         "latency_budget_ms": None}))
    dev2 = Device(make_cfg(tmp_path / "two", kp.pub_path, self_test_latency_ms=0.000001))
    # the device budget wins over a bundle's looser one
    with pytest.raises(SelfTestError, match="latency budget"):
        try:
            dev2.svc.install_bytes(bundle(models_dir, kp, 1, self_test=dict(
                json.loads(_manifest(good))["self_test"], latency_budget_ms=10000.0)))
        finally:
            dev2.close()


def _manifest(data: bytes) -> bytes:
    from tests.helpers.bundles import members_of

    return members_of(data)[0][1]


def test_stale_retained_fleet_rollback_is_not_applied_again(tmp_path, kp, models_dir):  # noqa: ANN001
    cfg = make_cfg(tmp_path, kp.pub_path)
    dev = Device(cfg)
    on_v1_v2(dev, models_dir, kp)
    old = desired("brightness", 0, rollback=True, rollback_from_version=3)
    dev.svc.desired.on_desired_state(old)  # does not apply (the device runs v2), but it is handled
    assert dev.version == 2
    assert dev.install(bundle(models_dir, kp, 3)) and dev.settle() == st.COMMITTED
    dev.close()
    dev = Device(cfg)  # restart: the broker re-delivers the retained message, which now names v3
    try:
        assert dev.version == 3
        dev.svc.desired.on_desired_state(old)
        assert dev.version == 3 and active(dev).version == 3
        fresh = desired("brightness", 0, rollback=True, rollback_from_version=3)
        fresh.issued_ms = old.issued_ms + 1
        dev.svc.desired.on_desired_state(fresh)
        assert dev.version == 2 and dev.svc.updater.state.state == st.ROLLED_BACK
        assert "fleet rollback from v3" in dev.svc.updater.state.snapshot()["reason"]
    finally:
        dev.close()


def test_fleet_rollback_without_from_version_is_ignored(device, kp, models_dir):  # noqa: ANN001
    dev = device()
    on_v1_v2(dev, models_dir, kp)
    dev.svc.desired.on_desired_state(desired("brightness", 1, rollback=True))
    assert dev.version == 2 and dev.svc.updater.state.state == st.COMMITTED


def test_fleet_rollback_blocked_by_the_update_lock_is_retried(device, kp, models_dir, monkeypatch):  # noqa: ANN001
    from edge.updater import service

    monkeypatch.setattr(service, "LOCK_WAIT_S", 0.05)
    dev = device()
    on_v1_v2(dev, models_dir, kp)
    order = desired("brightness", 0, rollback=True, rollback_from_version=2)
    cli = Updater.from_config(dev.cfg)  # an operator's `kestrel-edge install` holds the update lock
    with cli.locked(wait_s=10.0):  # (the worker may still hold it for the commit)
        dev.svc.desired.on_desired_state(order)
    assert dev.version == 2 and dev.svc.updater.state.get("fleet_rollback_ms") != order.issued_ms
    assert dev.svc.desired._retry is not None and dev.svc.desired._retry[1] is order  # not marked handled: retried
    dev.svc.desired._retry = (0.0, order)  # the retry is due: the worker runs it
    wait_for(lambda: dev.svc.updater.state.get("fleet_rollback_ms") == order.issued_ms, what="the retry")
    assert dev.version == 1 and dev.svc.updater.state.state == st.ROLLED_BACK


# ---- trust store and clock --------------------------------------------------------------------

def test_revoked_key_untrusts_installed_slots_at_boot(tmp_path, models_dir):  # noqa: ANN001
    trust = tmp_path / "trust"
    trust.mkdir()
    old, new = make_keypair(tmp_path, "old"), make_keypair(tmp_path, "new")
    for k in (old, new):
        (trust / f"{k.key_id}.pub").write_bytes(k.pub_path.read_bytes())
    cfg = make_cfg(tmp_path, trust)
    dev = Device(cfg)
    assert dev.install(bundle(models_dir, old, 1)) and dev.settle() == st.COMMITTED
    dev.baseline()
    assert dev.install(bundle(models_dir, new, 2)) and dev.settle() == st.COMMITTED
    dev.close()
    (trust / f"{new.key_id}.pub").unlink()  # the key that signed v2 is compromised: revoked
    dev = Device(cfg)
    try:
        assert dev.version == 1  # v2 is no longer trusted; the committed v1 (old key) is
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.FAILED and "no longer trusted" in snap["reason"]
    finally:
        dev.close()
    (trust / f"{old.key_id}.pub").unlink()
    (trust / "other.pub").write_bytes(make_keypair(tmp_path, "third").pub_path.read_bytes())
    with pytest.raises(SlotError, match="no usable signed model"):
        Device(cfg)


def test_clock_set_back_cannot_revive_an_expired_bundle(device, kp, models_dir):  # noqa: ANN001
    dev = device()
    now = time.time()
    ten_years = 10 * 365 * 86400.0
    dev.svc.updater.state.update(time_floor_s=now + ten_years)  # the device has seen a bundle signed then
    with pytest.raises(BundleError) as ei:
        dev.install(bundle(models_dir, kp, 1))  # valid for a year by the (set back) wall clock
    assert ei.value.reason == "expired"
    assert dev.svc.updater.clock() == (now + ten_years, False)


def test_unset_clock_uses_the_time_floor_and_accepts_newer_bundles(device, kp, models_dir):  # noqa: ANN001
    dev = device(clock_slack_s=0.0)
    floor = time.time() + 30 * 86400.0  # the wall clock is a month behind what the device has seen
    dev.svc.updater.state.update(time_floor_s=floor)
    # created after the floor: "from the future" for this clock, but the clock is known to be unset
    assert dev.install(bundle(models_dir, kp, 1, created=floor + 5 * 86400.0))
    assert dev.settle() == st.COMMITTED
    assert dev.svc.updater.state.get("time_floor_s") == pytest.approx(floor + 5 * 86400.0)


def test_install_command_has_no_trust_override(tmp_path, kp, models_dir):  # noqa: ANN001
    from edge.cli import update as updatecmd

    attacker = make_keypair(tmp_path, "attacker")
    path = tmp_path / "evil.kbundle"
    path.write_bytes(bundle(models_dir, attacker, 1))
    cfgp = tmp_path / "edge.toml"
    cfgp.write_text(f'[device]\nid = "dev1"\ndata_dir = "{tmp_path / "data"}"\n'
                    f'[update]\ntrust_dir = "{kp.pub_path}"\n')
    with pytest.raises(SystemExit):
        updatecmd.main(["install", str(path), "--config", str(cfgp), "--trust", str(attacker.pub_path)])
    assert updatecmd.main(["install", str(path), "--config", str(cfgp)]) == 2


def test_oversize_bundle_file_is_refused_before_reading(tmp_path, kp, capsys):  # noqa: ANN001
    from edge.cli import update as updatecmd

    big = tmp_path / "big.kbundle"
    with open(big, "wb") as fh:
        fh.truncate(3 * 1024 * 1024)  # sparse: reading it all would be the bug
    cfgp = tmp_path / "edge.toml"
    cfgp.write_text(f'[device]\nid = "dev1"\ndata_dir = "{tmp_path / "data"}"\n'
                    f'[update]\ntrust_dir = "{kp.pub_path}"\nmax_bundle_bytes = 1048576\n')
    assert updatecmd.main(["install", str(big), "--config", str(cfgp)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "too_large" in err


# ---- first model on trial: nothing committed to go back to ---------------------------------------

def _feed(dev: Device, n: int, level: float = BRIGHT) -> None:
    for i in range(n):
        m = dev.holder.get()
        t0 = time.perf_counter()
        s = m.infer(frame(level))
        dev.svc.observe(InferenceResult(i, m.ref, s, time.perf_counter() - t0, None, False, []))


def test_first_trial_failing_goes_back_to_the_factory_model(tmp_path, kp, models_dir):  # noqa: ANN001
    from edge.inference.runtime import load_model
    from tests.helpers.bundles import BRIGHTNESS_SPEC
    from tests.helpers.wait import wait_for

    factory_path = models_dir / "brightness_int8.tflite"
    cfg = make_cfg(tmp_path, kp.pub_path, trial_frames=10)
    cfg.model.path = str(factory_path)
    dev = Device(cfg)
    try:
        assert dev.holder.get() is None  # no slot: the daemon runs the factory model
        factory = load_model(str(factory_path), spec=BRIGHTNESS_SPEC, labels=["bright", "dark", "mid"])
        dev.holder.swap(factory)
        assert dev.install(bundle(models_dir, kp, 1, model="uniform_int8"))  # always low confidence
        wait_for(lambda: (_feed(dev, 2), dev.svc.updater.state.state in (st.ROLLED_BACK, st.FAILED))[1], 30,
                 what="the trial to end")
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.ROLLED_BACK and "factory model" in snap["reason"], snap["reason"]
        assert dev.holder.get() is factory
        assert dev.svc.updater.slots.active_name() is None  # the next start runs model.path again
        assert dev.svc.updater.state.floor("brightness") == 1  # never installed again
    finally:
        dev.close()


def test_first_trial_failing_after_a_restart_goes_back_to_the_factory_model(tmp_path, kp, models_dir):  # noqa: ANN001
    # the daemon was restarted cleanly during a first model's trial: the factory model is no longer
    # loaded, yet the failing trial ends where boot and `kestrel-edge rollback` would go (one rule)
    from tests.helpers.wait import wait_for

    cfg = make_cfg(tmp_path, kp.pub_path, trial_frames=10)
    cfg.model.path = str(models_dir / "brightness_int8.tflite")
    dev = Device(cfg)
    assert dev.install(bundle(models_dir, kp, 1, model="uniform_int8"))  # always low confidence
    dev.close()
    dev = Device(cfg)
    try:
        assert dev.svc.updater.state.state == st.TRIAL and dev.version == 1
        wait_for(lambda: (_feed(dev, 2), dev.svc.updater.state.state in (st.ROLLED_BACK, st.FAILED))[1], 30,
                 what="the trial to end")
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.ROLLED_BACK and "factory model" in snap["reason"], snap["reason"]
        assert dev.holder.get().ref.name == "brightness_int8"  # model.path's model runs again
        assert dev.svc.updater.slots.active_name() is None
        assert dev.svc.updater.state.floor("brightness") == 1  # never installed again
    finally:
        dev.close()


def test_first_trial_failing_without_factory_ends_in_a_terminal_state(tmp_path, kp, models_dir):  # noqa: ANN001
    from tests.helpers.wait import wait_for

    dev = Device(make_cfg(tmp_path, kp.pub_path, trial_frames=10))
    try:
        assert dev.install(bundle(models_dir, kp, 1, model="uniform_int8"))
        wait_for(lambda: (_feed(dev, 2), dev.svc.updater.state.state != st.TRIAL)[1], 30, what="trial end")
        snap = dev.svc.updater.state.snapshot()
        assert snap["state"] == st.FAILED and snap["trial"] is None
        assert "no previous model to go back to" in snap["reason"]
        assert dev.version == 1  # keeps running: there is nothing else
        assert dev.svc.updater.state.floor("brightness") == 1  # never installed again
        # a later desired state is handled at once, not parked behind a trial that never ends
        dev.svc.desired.on_desired_state(desired("brightness", 2))
        assert dev.svc.desired._pending_desired is None
    finally:
        dev.close()

