"""Run-dir IO on real Keras models: the .h5 is fsynced before its rename, and a SavedModel swap that fails
keeps the previous SavedModel (and leaves no temp or old copy behind)."""

from __future__ import annotations

import json
import os

import pytest

from proto import atomic
from tests.trainer.conftest import tiny_config
from trainer import rundir


def _tiny_model(units: int = 2):  # noqa: ANN202
    from trainer.tfenv import tf

    keras = tf().keras
    inp = keras.Input((4,), name="image")
    return keras.Model(inp, keras.layers.Dense(units, activation="softmax", name="scores")(inp))


def test_keras_file_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):  # noqa: ANN001, ANN202
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):  # noqa: ANN001, ANN202
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "float.h5"
    rundir.save_keras(_tiny_model(), path)
    monkeypatch.undo()
    tmp = str(atomic.temp_name(path))
    assert ("fsync", tmp) in events, events
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp))
    assert path.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["float.h5"]


def test_a_failed_saved_model_swap_keeps_the_previous_one(tmp_path, monkeypatch):
    from trainer.tfenv import tf

    path = tmp_path / "saved_model"
    spec = rundir.base_spec(tiny_config())
    rundir.save_saved_model(_tiny_model(2), path, spec, ["a", "b"])
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    real_replace = os.replace

    def replace(src, dst):  # noqa: ANN001, ANN202
        if str(dst) == str(path) and atomic.TMP_MARK in os.path.basename(str(src)):  # the new one into place
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        rundir.save_saved_model(_tiny_model(3), path, spec, ["a", "b", "c"])
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["saved_model"]          # no temp or old copy left
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before
    assert json.loads((path / rundir.INPUT_CONTRACT).read_text())["labels"] == ["a", "b"]
    loaded = tf().saved_model.load(str(path))
    assert loaded.signatures["serving_default"](image=tf().zeros((1, 4))).popitem()[1].shape == (1, 2)
    # With the rename working again, the new one replaces it whole.
    rundir.save_saved_model(_tiny_model(3), path, spec, ["a", "b", "c"])
    assert json.loads((path / rundir.INPUT_CONTRACT).read_text())["labels"] == ["a", "b", "c"]
    assert [p.name for p in tmp_path.iterdir()] == ["saved_model"]
