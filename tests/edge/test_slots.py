"""Slots, pointer and state file: atomic writes, switch, transitions persisted."""

from __future__ import annotations

import json
import os

import pytest

from edge.updater import state as st
from edge.updater.slots import SlotError, SlotStore, other
from proto import atomic
from tests.edge.test_updater import bundle
from tests.helpers.bundles import make_keypair


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):  # noqa: ANN001
    p = tmp_path / "d" / "f.json"
    atomic.write_json(p, {"a": 1})
    atomic.write_json(p, {"a": 2, "b": [1, 2]})
    assert json.loads(p.read_text()) == {"a": 2, "b": [1, 2]}
    assert sorted(os.listdir(p.parent)) == ["f.json"]


def test_state_transitions_persisted_and_reloaded(tmp_path):  # noqa: ANN001
    path = tmp_path / "state.json"
    s = st.StateFile(path)
    assert s.state == st.IDLE
    s.transition(st.DOWNLOADING, model_name="m", target_version=3)
    s.transition(st.VERIFIED)
    s.transition(st.FAILED, reason="self-test failed: x", reject=True)
    again = st.StateFile(path)
    snap = again.snapshot()
    assert (snap["state"], snap["reason"], snap["target_version"]) == (st.FAILED, "self-test failed: x", 3)
    assert [h["to"] for h in snap["history"]] == [st.DOWNLOADING, st.VERIFIED, st.FAILED]
    assert again.is_rejected("m", 3) and not again.is_rejected("m", 4)
    with pytest.raises(ValueError):
        s.transition("BOGUS")


def test_unreadable_state_file_starts_idle(tmp_path):  # noqa: ANN001
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert st.StateFile(path).state == st.IDLE


def test_stage_switch_and_integrity_check(tmp_path, models_dir):  # noqa: ANN001
    import time

    from proto.bundle import verify_bundle

    kp = make_keypair(tmp_path)
    store = SlotStore(tmp_path / "data")
    assert store.active_name() is None and store.target_for_staging() == "a"
    for version in (1, 2):
        data = bundle(models_dir, kp, version)
        vb = verify_bundle(data, kp.trusted, installed_version=version - 1, now=time.time())
        target = store.target_for_staging()
        slot = store.stage(target, vb, data)
        store.check(slot)
        assert {"manifest.json", "manifest.sig", "model.tflite", "labels.txt", "bundle.kbundle"} <= set(
            slot.record["files"])
        store.switch(target)
        assert store.active().version == version
    assert store.active_name() == "b" and store.inactive().version == 1
    assert store.pointer.read_text().strip() == "b"
    with pytest.raises(SlotError):
        store.stage("b", vb, data)  # never over the active slot
    # a flipped byte in a slot's model is caught before it is ever loaded
    model = store.active().model_path
    raw = bytearray(model.read_bytes())
    raw[200] ^= 1
    model.write_bytes(bytes(raw))
    with pytest.raises(SlotError, match="does not match"):
        store.check(store.active())
    assert other("a") == "b" and other("b") == "a"
    assert not (store.root / ".staging").exists()


def test_switch_to_empty_slot_refused(tmp_path):  # noqa: ANN001
    store = SlotStore(tmp_path)
    with pytest.raises(SlotError):
        store.switch("a")
    assert store.active_name() is None


def test_stage_fsyncs_each_staged_file_once(tmp_path, models_dir, monkeypatch):  # noqa: ANN001
    """write_staged leaves durability to stage's one fsync_tree: no staged file is fsynced twice, none
    is left out."""
    import collections
    import time

    from proto.bundle import verify_bundle

    kp = make_keypair(tmp_path)
    store = SlotStore(tmp_path / "data")
    data = bundle(models_dir, kp, 1)
    vb = verify_bundle(data, kp.trusted, now=time.time())
    synced: collections.Counter = collections.Counter()
    real = os.fsync

    def counting(fd: int) -> None:
        synced[os.fstat(fd).st_ino] += 1  # the inode: a file keeps it when renamed into place
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    slot = store.stage("a", vb, data)
    files = sorted(slot.record["files"])
    assert {n: synced[os.stat(slot.path / n).st_ino] for n in files} == {n: 1 for n in files}
    assert synced[os.stat(slot.path / "slot.json").st_ino] == 2  # write_json's own fsync, then the tree's


def test_unreadable_or_oversized_signed_manifest_makes_the_slot_unusable(tmp_path, models_dir):  # noqa: ANN001
    import time

    from proto.bundle import verify_bundle
    from proto.manifest import MAX_SIG_BYTES

    kp = make_keypair(tmp_path)
    store = SlotStore(tmp_path / "data")
    data = bundle(models_dir, kp, 1)
    slot = store.stage("a", verify_bundle(data, kp.trusted, now=time.time()), data)
    sig = slot.path / "manifest.sig"
    sig.write_bytes(sig.read_bytes() + b" " * MAX_SIG_BYTES)
    with pytest.raises(SlotError) as ei:
        store.check(slot, trusted=kp.trusted)
    assert str(ei.value).startswith("slot a: its signed manifest cannot be used: ")
    assert f"(limit {MAX_SIG_BYTES})" in str(ei.value) and "\n" not in str(ei.value)
    sig.unlink()
    with pytest.raises(SlotError, match="manifest.sig"):
        store.check(slot, trusted=kp.trusted)
