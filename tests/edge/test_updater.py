"""Install path end to end on real interpreters and real signed bundles; attack bundles refused.

Also holds the small helpers the other updater suites import (tests.edge.test_updater).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest

from edge import config
from edge.inference.runtime import load_model
from edge.pipeline.loop import InferenceResult, ModelHolder
from edge.updater import state as st
from edge.updater.service import UpdateService
from proto.errors import BundleError
from proto.hubcreds import Credentials
from tests.helpers.bundles import BRIGHTNESS_SPEC, make_bundle, make_keypair
from tests.helpers.wait import wait_for

PLAIN = Credentials(plaintext=True)  # the test registries' plain-text loopback port

BRIGHT = 0.9  # mean brightness: the brightness model is > 0.95 sure ("bright")


def make_cfg(tmp_path: Path, trust: Path, **update: Any) -> config.EdgeConfig:
    upd: Dict[str, Any] = {"trust_dir": str(trust), "trial_frames": 5, "trial_seconds": 0.0,
                           "clock_slack_s": 0.0, "max_boot_attempts": 2,
                           "tls": False}  # the test registries speak plain text on 127.0.0.1 unless given TLS
    upd.update(update)
    return config.from_dict({"device": {"id": "dev1", "data_dir": str(tmp_path / "data")},
                             "model": {"threads": 1}, "update": upd})


def self_test_for(model_path: Path, levels=(0.9, 0.1)) -> Dict[str, Any]:  # noqa: ANN001
    """Self-test cases computed like the trainer does: run the model on the edge runtime."""
    m = load_model(str(model_path), spec=BRIGHTNESS_SPEC, labels=["bright", "dark", "mid"])
    cases = []
    for level in levels:
        x = np.full(BRIGHTNESS_SPEC.shape, int(level * 255), np.uint8)
        cases.append({"input": base64.b64encode(x.tobytes()).decode(),
                      "expected": [float(v) for v in m.invoke(x)]})
    m.close()
    return {"tolerance": 0.02, "cases": cases, "latency_budget_ms": None}


def bundle(models_dir: Path, kp: Any, version: int, model: str = "brightness_int8", **kw: Any) -> bytes:
    path = models_dir / f"{model}.tflite"
    if "self_test" not in kw:
        kw["self_test"] = self_test_for(path)
    return make_bundle(path, kp, version=version, **kw)


def frame(level: float = BRIGHT) -> np.ndarray:
    return np.full((48, 64, 3), int(level * 255), np.uint8)


def infer_once(svc: UpdateService, holder: ModelHolder, seq: int, level: float = BRIGHT,
               threshold: float = 0.6) -> InferenceResult:
    """One real inference on the held model, fed to the health watch like the pipeline does."""
    model = holder.get()
    t0 = time.perf_counter()
    scores = model.infer(frame(level))
    lat = time.perf_counter() - t0
    res = InferenceResult(seq, model.ref, scores, lat, None, bool(float(np.max(scores)) < threshold), [])
    svc.observe(res)
    return res


def drive_until(svc: UpdateService, holder: ModelHolder, states: Any, level: float = BRIGHT,
                timeout: float = 60.0) -> str:
    seq = [0]

    def step() -> Optional[str]:
        seq[0] += 1
        infer_once(svc, holder, seq[0], level)
        s = svc.updater.state.state
        return s if s in states else None

    return wait_for(step, timeout, interval=0.001, what=f"update state in {states}")


class Device:
    """An UpdateService with a real ModelHolder, as the daemon wires it (no MQTT)."""

    def __init__(self, cfg: config.EdgeConfig, publisher: Any = None) -> None:
        self.cfg = cfg
        self.holder = ModelHolder()
        self.svc = UpdateService.from_config(cfg, publisher, self.holder, None)
        model = self.svc.boot_model()
        if model is not None:
            self.holder.swap(model)
        self.svc.start()

    def install(self, data: bytes) -> bool:
        return self.svc.install_bytes(data, source="test")

    def settle(self, level: float = BRIGHT) -> str:
        return drive_until(self.svc, self.holder, (st.COMMITTED, st.ROLLED_BACK, st.FAILED), level)

    def baseline(self, n: int = 20, level: float = BRIGHT) -> None:
        for i in range(n):
            infer_once(self.svc, self.holder, i, level)

    @property
    def version(self) -> int:
        return int(self.holder.get().ref.version)

    def close(self) -> None:
        self.svc.stop()


def test_good_bundle_committed_after_healthy_trial(device, kp, models_dir):  # noqa: ANN001
    dev = device()
    assert dev.holder.get() is None
    assert dev.install(bundle(models_dir, kp, 1))
    assert dev.svc.updater.state.state == st.TRIAL
    assert dev.settle() == st.COMMITTED
    dev.baseline()
    assert dev.install(bundle(models_dir, kp, 2))
    assert dev.version == 2
    assert dev.settle() == st.COMMITTED
    vm = dev.svc.version_manifest()
    assert (vm.installed.version, vm.previous.version, vm.update_state) == (2, 1, st.COMMITTED)
    assert vm.installed.sha256 == dev.holder.get().ref.sha256


def _tamper(data: bytes) -> bytes:
    b = bytearray(data)
    i = data.find(b"TFL3")  # inside the model file: the signed manifest's hash no longer matches
    b[i + 100] ^= 0xFF
    return bytes(b)


def _members(data: bytes) -> list:
    from tests.helpers.bundles import members_of

    return members_of(data)


def _field_changed_after_signing(data: bytes) -> bytes:
    from tests.helpers.bundles import rebuild

    members = _members(data)
    doc = json.loads(members[0][1])
    doc["default_threshold"] = 0.0  # e.g. to silence the sampler; the signature covers the old bytes
    from proto.manifest import canonical_json

    members[0] = ("manifest.json", canonical_json(doc))
    return rebuild(members)


def _with_member(data: bytes, name: bytes, typeflag: bytes = b"0", content: bytes = b"x",
                 linkname: bytes = b"") -> bytes:
    """The bundle's members plus one hostile member (traversal, link...), in raw ustar form."""
    from tests.helpers.bundles import raw_container, tar_header

    ents = [(tar_header(n, len(c)), c) for n, c in _members(data)]
    ents.append((tar_header(name, len(content) if typeflag == b"0" else 0, typeflag=typeflag,
                            linkname=linkname), content if typeflag == b"0" else b""))
    return raw_container(ents)


def _longer_than_declared(data: bytes) -> bytes:
    from tests.helpers.bundles import rebuild

    return rebuild([(n, c + b"\0" if n == "model.tflite" else c) for n, c in _members(data)])


def _extra_file(data: bytes) -> bytes:
    from tests.helpers.bundles import rebuild

    return rebuild(_members(data) + [("zz-extra.bin", b"not in the manifest")])


ATTACKS = {
    "tampered": lambda models_dir, kp, other: _tamper(bundle(models_dir, kp, 3)),
    "field_changed_after_signing": lambda models_dir, kp, other: _field_changed_after_signing(
        bundle(models_dir, kp, 3)),
    "untrusted": lambda models_dir, kp, other: bundle(models_dir, other, 3),
    "downgrade": lambda models_dir, kp, other: bundle(models_dir, kp, 1),
    "expired": lambda models_dir, kp, other: bundle(models_dir, kp, 3, expires_in_s=60,
                                                    created=time.time() - 3600),
    "truncated": lambda models_dir, kp, other: bundle(models_dir, kp, 3)[:3000],
    "traversal": lambda models_dir, kp, other: _with_member(bundle(models_dir, kp, 3), b"../../evil.py"),
    "symlink": lambda models_dir, kp, other: _with_member(bundle(models_dir, kp, 3), b"zz-link", b"2",
                                                          linkname=b"/etc/passwd"),
    "hardlink": lambda models_dir, kp, other: _with_member(bundle(models_dir, kp, 3), b"zz-link", b"1",
                                                           linkname=b"model.tflite"),
    "longer_than_declared": lambda models_dir, kp, other: _longer_than_declared(bundle(models_dir, kp, 3)),
    "extra_file": lambda models_dir, kp, other: _extra_file(bundle(models_dir, kp, 3)),
    "wrong_model": lambda models_dir, kp, other: bundle(models_dir, kp, 50, name="some-other-model"),
    "oversize": lambda models_dir, kp, other: bundle(models_dir, kp, 3, extra_files={"pad.bin": b"\0" * 70000}),
}
def _tree(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


REASON = {"tampered": "hash_mismatch", "field_changed_after_signing": "bad_signature",
          "untrusted": "untrusted_key", "downgrade": "downgrade", "expired": "expired", "truncated": "truncated",
          "traversal": "bad_container", "symlink": "bad_container", "hardlink": "bad_container",
          "longer_than_declared": "length_mismatch", "extra_file": "extra_file", "wrong_model": "wrong_model",
          "oversize": "too_large"}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_bundles_refused_running_model_untouched(device, kp, models_dir, tmp_path,  # noqa: ANN001
                                                        attack):  # noqa: ANN001
    dev = device(trial_frames=0, max_bundle_bytes=64 * 1024)
    assert dev.install(bundle(models_dir, kp, 2))
    running = dev.holder.get()
    before = dev.svc.updater.slots.active()
    slots_before = _tree(before.path.parent)
    other = make_keypair(tmp_path, name="attacker")
    with pytest.raises(BundleError) as ei:
        dev.install(ATTACKS[attack](models_dir, kp, other))
    msg = str(ei.value)
    assert "\n" not in msg and msg
    assert ei.value.reason == REASON[attack], msg
    # nothing was written next to the slots (no traversal target, no staging left behind)
    assert _tree(before.path.parent) == slots_before
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "data" / "evil.py").exists()
    assert dev.holder.get() is running
    assert float(np.max(running.infer(frame()))) > 0.9  # still runs
    after = dev.svc.updater.slots.active()
    assert (after.name, after.version, after.model_sha256) == (before.name, before.version,
                                                               before.model_sha256)
    snap = dev.svc.updater.state.snapshot()
    assert snap["state"] == st.FAILED and ei.value.reason in snap["reason"]


def test_replay_of_installed_bundle_is_nothing_to_do(device, kp, models_dir):  # noqa: ANN001
    dev = device(trial_frames=0)
    data = bundle(models_dir, kp, 2)
    assert dev.install(data)
    running = dev.holder.get()
    assert dev.install(data) is False
    assert dev.holder.get() is running
    assert dev.svc.updater.state.state == st.COMMITTED


def test_status_reported_on_every_transition(tmp_path, kp, models_dir):  # noqa: ANN001
    class Recorder:
        def __init__(self) -> None:
            self.msgs: list = []

        def publish_status(self, msg: Any) -> None:
            self.msgs.append(msg)

        def status_message(self, state: str) -> Any:  # what the daemon's status provider adds
            from proto import kestrel_pb2

            return kestrel_pb2.Status(device_id="d", state=state, software_version="9.9",
                                      confidence_threshold=0.42)

        def subscribe(self, *a: Any, **k: Any) -> None:
            pass

    rec = Recorder()
    dev = Device(make_cfg(tmp_path, kp.pub_path), publisher=rec)
    try:
        dev.install(bundle(models_dir, kp, 1))
        dev.settle()
    finally:
        dev.close()
    states = [m.versions.update_state for m in rec.msgs]
    assert states == [st.VERIFIED, st.STAGED, st.SELF_TEST, st.TRIAL, st.COMMITTED]
    assert rec.msgs[-1].versions.installed.version == 1 and rec.msgs[-1].model.version == 1
    # every report is the daemon's whole Status (software version, threshold in force), not a partial one
    assert all(m.software_version == "9.9" and m.HasField("confidence_threshold") for m in rec.msgs)
    assert rec.msgs[-1].confidence_threshold == pytest.approx(0.42)


def test_one_state_write_per_transition(device, kp, models_dir, monkeypatch):  # noqa: ANN001
    """A slot outcome or a floor changes in the same write as its transition; the only writes without
    a transition are the floor raised right after each pointer flip and the self-test figures."""
    from proto import atomic

    writes: list = []
    real = atomic.write_json

    def counting(path: Any, doc: Any, *a: Any, **k: Any) -> None:
        if Path(path).name == "state.json":
            writes.append(json.loads(json.dumps(doc)))
        real(path, doc, *a, **k)

    monkeypatch.setattr(atomic, "write_json", counting)
    dev = device(trial_frames=5)
    dev.install(bundle(models_dir, kp, 1))
    assert dev.settle() == st.COMMITTED
    dev.install(bundle(models_dir, kp, 2))
    assert dev.settle() == st.COMMITTED
    upd = dev.svc.updater
    with upd.locked(wait_s=30.0):  # the worker may still hold it, finishing the commit
        upd.rollback("test: ordered rollback")
    assert upd.state.state == st.ROLLED_BACK and upd.state.floor("brightness") == 2
    without_transition = []
    for prev, cur in zip(writes, writes[1:]):
        if cur["history"] != prev["history"]:
            continue
        changed = sorted(k for k in cur if cur[k] != prev.get(k))
        without_transition.append(changed)
    # per install: the self-test figures (pending_slot, self_test), then the floor after the flip
    assert without_transition == [["pending_slot", "self_test"], ["floors", "time_floor_s"]] * 2
    assert len(writes) == len(writes[-1]["history"]) + 4


def test_signed_created_time_kept_in_slot_record_and_old_slots_still_boot(tmp_path, kp, models_dir):  # noqa: ANN001
    """slot.json carries the bundle's signed ``created`` (the time floor comes from it, not from
    re-parsing the manifest); a slot staged before it had that field boots and reads the manifest."""
    from proto import atomic

    created = int(time.time()) - 600
    cfg = make_cfg(tmp_path, kp.pub_path, trial_frames=0)
    dev = Device(cfg)
    try:
        assert dev.install(bundle(models_dir, kp, 1, created=created))
        slot = dev.svc.updater.slots.active()
        assert slot.record["created"] == created
        assert dev.svc.updater.state.get("time_floor_s") == created
    finally:
        dev.close()
    rec = dict(slot.record)
    del rec["created"]  # as staged by an older version of the updater
    atomic.write_json(slot.path / "slot.json", rec)
    upd = dev.svc.updater
    upd.state.modify(lambda d: d.update(time_floor_s=0.0))
    again = Device(cfg)
    try:
        assert again.version == 1
        assert again.svc.updater.state.get("time_floor_s") == created
    finally:
        again.close()
    rec["created"] = created + 10 ** 6  # an unsigned time in slot.json must not raise the time floor
    atomic.write_json(slot.path / "slot.json", rec)
    from edge.updater.slots import SlotError

    with pytest.raises(SlotError, match="does not match its signed manifest"):
        again.svc.updater.check_slot(again.svc.updater.slots.active())


# ---- the CLI ----------------------------------------------------------------------------------

def _toml(tmp_path: Path, kp: Any, **update: Any) -> Path:
    upd = {"trust_dir": str(kp.pub_path), "trial_frames": 5, "trial_seconds": 0.0}
    upd.update(update)
    lines = ["[device]", f'data_dir = "{tmp_path / "data"}"', 'id = "dev1"', "[update]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in upd.items()]
    p = tmp_path / "edge.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("name", ["modèle", ".hidden", "-a", "_a", "a" * 65, "a b", "a/b"])
def test_update_model_name_no_bundle_can_carry_is_a_config_error(tmp_path, kp, name):  # noqa: ANN001
    from proto.errors import ConfigError

    with pytest.raises(ConfigError) as ei:
        config.load(str(_toml(tmp_path, kp, model_name=name)))
    assert "model_name" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("key,value,needle", [
    ("max_bundle_bytes", 100, "max_bundle_bytes must be at least 1024, not 100"),
    ("clock_slack_s", -1.0, "clock_slack_s must be >= 0, not -1.0"),
    ("self_test_latency_ms", 0.0, "self_test_latency_ms must be > 0"),
    ("self_test_min_cases", -1, "self_test_min_cases must be >= 0"),
    ("self_test_max_tolerance", 1.5, "self_test_max_tolerance must be within 0..1, not 1.5"),
    ("trial_max_low_conf_abs", -0.1, "trial_max_low_conf_abs must be within 0..1"),
    ("trial_latency_floor_ms", -1.0, "trial_latency_floor_ms must be >= 0"),
    ("trial_max_latency_ratio", 1.0, "trial_max_latency_ratio must be > 1, not 1.0"),
    ("trial_max_errors", 0, "trial_max_errors must be > 0, not 0"),
    ("trial_stall_s", float("nan"), "trial_stall_s must be > 0, not nan"),
    ("max_boot_attempts", 0, "max_boot_attempts must be > 0"),
])
def test_update_config_out_of_range_is_one_line_naming_the_key(tmp_path, kp, key, value, needle):  # noqa: ANN001
    from proto.errors import ConfigError

    path = _toml(tmp_path, kp)
    path.write_text(path.read_text() + f"{key} = {'nan' if value != value else json.dumps(value)}\n")
    with pytest.raises(ConfigError) as ei:
        config.load(str(path))
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_update_model_name_bundles_carry_is_accepted(tmp_path, kp):  # noqa: ANN001
    for name in ("brightness", "B-2.v_3", "a" * 64):
        assert config.load(str(_toml(tmp_path, kp, model_name=name))).update.model_name == name


def test_cli_install_status_rollback(tmp_path, kp, models_dir, capsys):  # noqa: ANN001
    from edge.cli import update as updatecmd

    cfgp = _toml(tmp_path, kp)
    for v in (1, 2):
        (tmp_path / f"v{v}.kbundle").write_bytes(bundle(models_dir, kp, v))
    assert updatecmd.main(["install", str(tmp_path / "v1.kbundle"), "--config", str(cfgp)]) == 0
    # v1 is on trial (the daemon has not run it yet): a second install waits
    assert updatecmd.main(["install", str(tmp_path / "v2.kbundle"), "--config", str(cfgp)]) == 2
    err = capsys.readouterr().err
    assert "on trial" in err and len(err.strip().splitlines()) == 1
    # the daemon starts: the trial passes
    dev = Device(config.load(cfgp))
    try:
        assert dev.settle() == st.COMMITTED
    finally:
        dev.close()
    assert updatecmd.main(["install", str(tmp_path / "v2.kbundle"), "--config", str(cfgp)]) == 0
    capsys.readouterr()
    assert updatecmd.main(["status", "--json", "--config", str(cfgp)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["installed"]["version"], s["previous"]["version"], s["state"]) == (2, 1, st.TRIAL)
    assert updatecmd.main(["rollback", "--config", str(cfgp)]) == 0
    assert updatecmd.main(["status", "--json", "--config", str(cfgp)]) == 0
    s = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert (s["installed"]["version"], s["state"]) == (1, st.ROLLED_BACK)
    bad = tmp_path / "bad.kbundle"
    bad.write_bytes(_tamper(bundle(models_dir, kp, 3)))
    assert updatecmd.main(["install", str(bad), "--config", str(cfgp)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err


def test_cli_asks_running_daemon_to_hot_swap_and_roll_back(tmp_path, kp, models_dir):  # noqa: ANN001
    from edge.cli import update as updatecmd

    cfgp = _toml(tmp_path, kp, trial_frames=0)
    dev = Device(config.load(cfgp))
    try:
        assert dev.install(bundle(models_dir, kp, 1))
        (tmp_path / "v2.kbundle").write_bytes(bundle(models_dir, kp, 2))
        assert updatecmd.main(["install", str(tmp_path / "v2.kbundle"), "--config", str(cfgp)]) == 0
        wait_for(lambda: dev.version == 2, 10, what="daemon hot-swapped to v2")
        assert updatecmd.main(["rollback", "--config", str(cfgp)]) == 0
        wait_for(lambda: dev.svc.updater.state.state == st.ROLLED_BACK, 10, what="daemon rolled back")
        assert dev.version == 1
    finally:
        dev.close()


def test_cli_waits_briefly_for_the_update_lock_then_says_busy(tmp_path, kp, models_dir, monkeypatch,  # noqa: ANN001
                                                               capsys):  # noqa: ANN001
    """`kestrel-edge install` waits up to CLI_LOCK_WAIT_S for a lock the daemon holds for a moment (a hot
    swap, a commit) instead of failing at once; held longer (a download), it is one line and exit 2."""
    import threading

    from edge.cli import update as updatecmd
    from edge.updater.engine import Updater

    cfgp = _toml(tmp_path, kp, trial_frames=0)
    (tmp_path / "v1.kbundle").write_bytes(bundle(models_dir, kp, 1))
    (tmp_path / "v2.kbundle").write_bytes(bundle(models_dir, kp, 2))
    holder = Updater.from_config(config.load(cfgp))  # another holder of the lock (the daemon's worker)
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.locked():
            taken.set()
            release.wait(10)

    monkeypatch.setattr(updatecmd, "CLI_LOCK_WAIT_S", 5.0)
    t = threading.Thread(target=hold)
    t.start()
    assert taken.wait(5)
    timer = threading.Timer(0.3, release.set)  # the holder lets go while the command waits
    timer.start()
    try:
        assert updatecmd.main(["install", str(tmp_path / "v1.kbundle"), "--config", str(cfgp)]) == 0
    finally:
        release.set()
        t.join(5)
    assert "installed brightness v1" in capsys.readouterr().out

    release.clear()
    taken.clear()
    monkeypatch.setattr(updatecmd, "CLI_LOCK_WAIT_S", 0.2)
    t = threading.Thread(target=hold)
    t.start()
    assert taken.wait(5)
    try:
        assert updatecmd.main(["install", str(tmp_path / "v2.kbundle"), "--config", str(cfgp)]) == 2
    finally:
        release.set()
        t.join(5)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another update is being installed" in err[0], err


# ---- desired state over MQTT + resumable gRPC fetch ------------------------------------------

class _Registry:
    """A tiny real ModelRegistry gRPC server serving bundle files; can cut the first stream mid-way. With
    ``tls`` (tests.helpers.tlscerts.make_tls) it speaks TLS only, with ``token`` it serves only the calls
    that carry ``authorization: Bearer <token>`` (as the hub's check does: hub/grpc_auth.py)."""

    def __init__(self, files: Dict[tuple, bytes], cut_after: int = 0, tls: Any = None, token: str = "") -> None:
        from concurrent import futures

        import grpc

        from proto import kestrel_pb2, kestrel_pb2_grpc

        self.files = files
        self.cut_after = cut_after
        self.token = token
        self.requests: list = []
        outer = self

        class Servicer(kestrel_pb2_grpc.ModelRegistryServicer):
            def FetchModel(self, request, context):  # noqa: ANN001, N802, ANN202
                import hashlib

                outer.requests.append((request.model_name, request.version, request.offset))
                if outer.token and dict(context.invocation_metadata()).get("authorization") != \
                        f"Bearer {outer.token}":
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "the token is not valid (unknown or revoked)")
                data = outer.files.get((request.model_name, request.version))
                if data is None:
                    context.abort(grpc.StatusCode.NOT_FOUND, "no such bundle")
                sha = hashlib.sha256(data).hexdigest()
                off = int(request.offset)
                sent = 0
                while off < len(data):
                    if outer.cut_after and sent >= outer.cut_after:
                        outer.cut_after = 0
                        context.abort(grpc.StatusCode.UNAVAILABLE, "connection cut (test)")
                    chunk = data[off:off + 4096]
                    yield kestrel_pb2.FetchChunk(data=chunk, offset=off, total_size=len(data), sha256=sha)
                    off += len(chunk)
                    sent += len(chunk)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        kestrel_pb2_grpc.add_ModelRegistryServicer_to_server(Servicer(), self.server)
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        else:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


def test_fetch_resumes_after_cut_stream_and_checks_hash(tmp_path, kp, models_dir):  # noqa: ANN001
    import hashlib

    from edge.updater import fetch

    data = bundle(models_dir, kp, 2)
    reg = _Registry({("brightness", 2): data}, cut_after=8192)
    try:
        sha = hashlib.sha256(data).hexdigest()
        part = fetch.fetch_bundle(reg.target, "brightness", 2, downloads=tmp_path / "dl", sha256=sha,
                                  size=len(data), max_bundle_bytes=10 ** 8, creds=PLAIN)
        assert part.read_bytes() == data
        assert [r[2] for r in reg.requests] == [0, 8192]  # resumed from the part file's size
        part.unlink()
        with pytest.raises(BundleError) as ei:
            fetch.fetch_bundle(reg.target, "brightness", 2, downloads=tmp_path / "dl", sha256="0" * 64,
                               max_bundle_bytes=10 ** 8, creds=PLAIN)
        assert ei.value.reason == "hash_mismatch"
        assert not fetch.part_path(tmp_path / "dl", "brightness", 2).exists()
        n = len(reg.requests)
        with pytest.raises(BundleError) as ei:
            fetch.fetch_bundle(reg.target, "brightness", 2, downloads=tmp_path / "dl", size=len(data),
                               max_bundle_bytes=len(data) - 1, creds=PLAIN)
        assert ei.value.reason == "too_large" and len(reg.requests) == n  # refused before download
    finally:
        reg.stop()


def _token_file(path: Path, token: str, mode: int = 0o600) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def test_fetch_over_tls_with_the_devices_token(tmp_path, kp, models_dir):  # noqa: ANN001
    """The device's side of authenticated gRPC: TLS verified with the fleet CA, its token on the call; a refused
    token or a CA that does not sign the hub's certificate ends the download at once, saying which setting."""
    import hashlib

    from edge.updater import fetch
    from proto.errors import ConfigError, HubError
    from tests.helpers.tlscerts import make_tls

    data = bundle(models_dir, kp, 2)
    tls = make_tls(tmp_path / "tls")
    reg = _Registry({("brightness", 2): data}, tls=tls, token="kst_device-token")
    good = _token_file(tmp_path / "grpc-token", "kst_device-token")
    try:
        creds = fetch.credentials(True, str(tls.ca), str(good))
        part = fetch.fetch_bundle(reg.target, "brightness", 2, downloads=tmp_path / "dl",
                                  sha256=hashlib.sha256(data).hexdigest(), max_bundle_bytes=10 ** 8, creds=creds)
        assert part.read_bytes() == data
        part.unlink()
        n = len(reg.requests)
        wrong = fetch.credentials(True, str(tls.ca), str(_token_file(tmp_path / "old-token", "kst_revoked")))
        with pytest.raises(HubError) as ei:
            fetch.fetch_bundle(reg.target, "brightness", 2, downloads=tmp_path / "dl", max_bundle_bytes=10 ** 8,
                               creds=wrong)
        assert "refused our token (UNAUTHENTICATED" in str(ei.value) and "[update] token_file" in str(ei.value)
        assert len(reg.requests) == n + 1  # no quick retries: the answer will not change in seconds
        other = make_tls(tmp_path / "other", ca_name="another CA")
        with pytest.raises(HubError) as ei:
            fetch.fetch_bundle(reg.target, "brightness", 2, downloads=tmp_path / "dl", max_bundle_bytes=10 ** 8,
                               creds=fetch.credentials(True, str(other.ca), str(good)))
        assert "TLS with the hub" in str(ei.value) and "[update] ca_file" in str(ei.value)
        assert len(reg.requests) == n + 1  # the handshake failed: the server never saw the call
        with pytest.raises(ConfigError, match="readable by everyone"):
            fetch.credentials(True, str(tls.ca), str(_token_file(tmp_path / "open-token", "kst_x", 0o644)))
        with pytest.raises(ConfigError, match="plain text"):  # a token never travels in plain text off this machine
            fetch.fetch_bundle("10.9.8.7:50051", "brightness", 2, downloads=tmp_path / "dl", max_bundle_bytes=10 ** 8,
                               creds=fetch.credentials(False, "", str(good)))
    finally:
        reg.stop()
    with pytest.raises(Exception, match="plain text"):  # and the config says so before the daemon starts
        make_cfg(tmp_path, kp.pub_path, hub_grpc="hub.example:50051", token_file=str(good))


def test_desired_state_over_mqtt_fetches_installs_and_fleet_rollback(tmp_path, kp, models_dir,  # noqa: ANN001
                                                                      broker):  # noqa: ANN001
    import hashlib

    import paho.mqtt.client as mqtt

    from proto import kestrel_pb2, topics
    from tests.edge.conftest import publisher_for
    from tests.helpers.fleet import fleet_keypair, signed
    from tests.helpers.tlscerts import make_tls

    v1, v2 = bundle(models_dir, kp, 1), bundle(models_dir, kp, 2)
    fleet = fleet_keypair(tmp_path)
    tls = make_tls(tmp_path / "tls")  # the hub's registry as the device meets it: TLS and its token
    reg = _Registry({("brightness", 1): v1, ("brightness", 2): v2}, cut_after=4096, tls=tls, token="kst_dev1")
    cfg = make_cfg(tmp_path, kp.pub_path, hub_grpc=reg.target, fleet_keys=[str(fleet.pub_path)], tls=True,
                   ca_file=str(tls.ca), token_file=str(_token_file(tmp_path / "grpc-token", "kst_dev1")))
    cfg.mqtt.host, cfg.mqtt.port = broker.host, broker.port
    pub = publisher_for(cfg, "dev1", tmp_path / "spool")
    pub.start()
    dev = Device(cfg, publisher=pub)
    hub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    hub.connect(broker.host, broker.port)
    hub.loop_start()

    def order(version: int, data: bytes, rollback: bool = False, topic: str = "") -> None:
        msg = kestrel_pb2.DesiredState(model_name="brightness", version=version, rollback=rollback,
                                       sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                                       issued_ms=int(time.time() * 1000),
                                       rollback_from_version=version if rollback else 0)
        topic = topic or topics.group_desired("default")
        hub.publish(topic, signed(topic, msg, fleet), qos=1, retain=True).wait_for_publish(10)

    try:
        order(1, v1)
        wait_for(lambda: dev.holder.get() is not None, 30, what="v1 fetched and switched")
        assert dev.settle() == st.COMMITTED
        dev.baseline()
        order(2, v2, topic=topics.device_desired("dev1"))  # device-specific wins over the group
        wait_for(lambda: dev.version == 2, 30, what="v2 fetched and switched")
        assert dev.settle() == st.COMMITTED
        order(1, v1)  # the group still says v1, but the device's own desired state wins: nothing
        order(2, v2, rollback=True, topic=topics.device_desired("dev1"))
        wait_for(lambda: dev.svc.updater.state.state == st.ROLLED_BACK, 30, what="fleet rollback")
        assert dev.version == 1  # the device's own previous slot
        assert [r[1] for r in reg.requests if r[2] == 0] == [1, 2]  # nothing older fetched for the rollback
    finally:
        for t in (topics.group_desired("default"), topics.device_desired("dev1")):
            hub.publish(t, b"", qos=1, retain=True).wait_for_publish(10)
        hub.loop_stop()
        hub.disconnect()
        dev.close()
        pub.stop(1.0)
        reg.stop()
