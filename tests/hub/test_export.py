"""Labels and the export of labelled frames (real SQLite, real PNG/JPEG images, the trainer's own scanner)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from hub.cli import export as exportcmd
from hub.errors import NotFound
from hub.export import ExportError, export_dataset
from hub.labels import LabelError, set_label, validate_label
from hub.store.base import FrameRecord
from hub.store.open import open_store


def _image(value: int, fmt: str) -> bytes:
    img = np.full((32, 40, 3), value, np.uint8)
    img[::4, ::4] = 255 - value
    ok, enc = cv2.imencode(".png" if fmt == "png" else ".jpg", img)
    assert ok
    return enc.tobytes()


def _frame(i: int, fmt: str = "png", capture_ms: int = 1_700_000_000_000) -> FrameRecord:
    return FrameRecord(frame_id=f"cam-1:boot/{i}", device_id="cam-1", capture_time_ms=capture_ms + i,
                       received_ms=capture_ms + i + 5, model_name="brightness", model_version=3,
                       model_sha256="ab" * 32, reasons=["LOW_CONFIDENCE"],
                       top_k=[{"index": 0, "label": "bright", "score": 0.4}], image=_image(20 * i % 256, fmt),
                       image_format=fmt, width=40, height=32, sequence=i)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "hub.db")
    for i in range(7):
        s.add_frame(_frame(i, "jpeg" if i % 2 else "png"))
    yield s
    s.close()


def _label_some(store) -> None:
    for i, label in [(0, "bright"), (1, "bright"), (2, "dark"), (3, "dark"), (4, "mid")]:
        set_label(store, f"cam-1:boot/{i}", label)


def test_label_rules_and_unknown_frame(store):
    for good in ("cat", "Dog_2", "a.b-c", "9lives"):
        assert validate_label(good) == good
    for bad in ("", ".", "..", ".hidden", "a/b", "a\\b", "x" * 65, "con", "space name", "ü"):
        with pytest.raises(LabelError):
            validate_label(bad)
    rec = set_label(store, "cam-1:boot/0", "bright", clock=lambda: 1234.5)
    assert rec.label == "bright" and rec.labelled_ms == 1234500
    with pytest.raises(LabelError):
        set_label(store, "cam-1:boot/0", "../etc")
    assert store.get_frame("cam-1:boot/0").label == "bright"
    with pytest.raises(NotFound):
        set_label(store, "nope", "bright")
    assert set_label(store, "cam-1:boot/0", None).label is None


def test_export_writes_class_folders_and_manifest_for_labelled_frames_only(store, tmp_path):
    _label_some(store)
    out = tmp_path / "ds"
    res = export_dataset(store, out)
    assert res.frames == 5 and res.classes == {"bright": 2, "dark": 2, "mid": 1}
    assert sorted(p.name for p in out.iterdir()) == ["bright", "dark", "manifest.json", "mid"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == 1 and manifest["classes"] == res.classes
    by_id = {e["frame_id"]: e for e in manifest["frames"]}
    assert set(by_id) == {f"cam-1:boot/{i}" for i in range(5)}  # frames 5 and 6 are unlabelled
    for fid, e in by_id.items():
        data = (out / e["file"]).read_bytes()
        assert data == store.get_frame(fid).image
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        assert Path(e["file"]).parent.name == e["label"] and e["device_id"] == "cam-1"
        assert e["model_version"] == 3 and e["capture_time_ms"] == store.get_frame(fid).capture_time_ms
        assert Path(e["file"]).suffix == (".png" if store.get_frame(fid).image_format == "png" else ".jpg")
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (32, 40, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]  # no temp dir left


def test_trainer_ingest_reads_the_export(store, tmp_path):
    ingest = pytest.importorskip("trainer.ingest")
    _label_some(store)
    out = tmp_path / "ds"
    export_dataset(store, out)
    scan = ingest.scan_sources([str(out)])
    assert sorted({c.label for c in scan.candidates}) == ["bright", "dark", "mid"]
    assert len(scan.candidates) == 5 and not scan.dropped
    assert scan.manifests[str(out)]["frames"] == 5


def test_reexport_refuses_without_force_and_never_replaces_foreign_dirs(store, tmp_path):
    _label_some(store)
    out = tmp_path / "ds"
    export_dataset(store, out)
    with pytest.raises(ExportError, match="--force"):
        export_dataset(store, out)
    set_label(store, "cam-1:boot/5", "mid")
    res = export_dataset(store, out, force=True)
    assert res.classes["mid"] == 2 and len(list((out / "mid").iterdir())) == 2
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a previous export"):
        export_dataset(store, foreign, force=True)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_unsafe_label_in_store_is_refused_with_clear_error(store, tmp_path):
    _label_some(store)
    store.set_label("cam-1:boot/6", "../escape", 1)  # written around hub.labels (e.g. an old hub version)
    with pytest.raises(ExportError, match="invalid label '../escape'"):
        export_dataset(store, tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not (tmp_path / "escape").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]  # the temp dir is gone


def test_min_per_class_since_and_empty(store, tmp_path):
    with pytest.raises(ExportError, match="no labelled frames"):
        export_dataset(store, tmp_path / "none")
    _label_some(store)
    res = export_dataset(store, tmp_path / "a", min_per_class=2)
    assert res.classes == {"bright": 2, "dark": 2} and res.skipped_classes == {"mid": 1}
    assert not (tmp_path / "a" / "mid").exists()
    res = export_dataset(store, tmp_path / "b", since_ms=1_700_000_000_000 + 2)
    assert res.classes == {"dark": 2, "mid": 1}


def test_export_command(store, tmp_path, capsys):
    _label_some(store)
    cfg = tmp_path / "hub.toml"
    cfg.write_text(f'[hub]\ndata_dir = "{tmp_path}"\n[store]\nurl = "sqlite:///{tmp_path / "hub.db"}"\n')
    ns = argparse.Namespace(config=str(cfg), out=str(tmp_path / "cli"), since="2023-11-14T22:13:20Z",
                            min_per_class=0, force=False, json=True)
    assert exportcmd.run(ns) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 5 and summary["classes"] == {"bright": 2, "dark": 2, "mid": 1}
    assert exportcmd.parse_since("1700000000002") == 1_700_000_000_002
    assert exportcmd.parse_since("2023-11-14") == 1_699_920_000_000
    with pytest.raises(Exception, match="ISO date"):
        exportcmd.parse_since("last tuesday")
