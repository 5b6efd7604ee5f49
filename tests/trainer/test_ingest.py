"""Ingestion and cleaning: merge, drops with reasons, image modes, near-duplicate grouping, bad input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edge.inputspec import InputSpec
from tests.trainer.imgs import class_folders, pattern, write
from trainer.errors import DataError
from trainer.ingest import check_enough, clean, near_duplicate_groups, phash, scan_sources
from trainer.preprocess import resize_to_input
from trainer.split import holdout_split, kfold

SPEC = InputSpec(shape=[1, 16, 16, 3])


def test_sources_merge_by_class_name(tmp_path):
    a = class_folders(tmp_path / "a", {"cat": 3, "dog": 2}, seed0=0)
    b = class_folders(tmp_path / "b", {"dog": 4, "owl": 2}, seed0=100)
    (b / "manifest.json").write_text(json.dumps({"frames": [{"file": "dog/000.png", "label": "dog"}]}))
    scan = scan_sources([str(a), str(b)])
    ds, rep = clean(scan, SPEC, min_side=8, phash_distance=0)
    assert ds.class_names == ["cat", "dog", "owl"]
    assert rep["classes"] == {"cat": 3, "dog": 6, "owl": 2}
    assert rep["manifests"] == {str(b): {"frames": 1}}
    assert ds.images.shape == (11, 16, 16, 3) and ds.images.dtype == np.uint8


def test_cleaning_drops_with_reasons(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    good = cv2.imencode(".png", pattern(77, 64))[1].tobytes()
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    jpg = cv2.imencode(".jpg", pattern(78, 64))[1].tobytes()
    (root / "b" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    write(root / "b" / "tiny.png", pattern(79, 4))
    (root / "b" / "copy.png").write_bytes((root / "b" / "000.png").read_bytes())
    (root / "a" / "notes.txt").write_text("hello")
    ds, rep = clean(scan_sources([str(root)]), SPEC, min_side=8, phash_distance=0)
    reasons = {d["path"].rsplit("/", 1)[-1]: d["reason"] for d in rep["dropped"]}
    assert reasons == {"corrupt.png": "unreadable", "truncated.png": "unreadable", "truncated.jpg": "unreadable",
                       "tiny.png": "tiny", "copy.png": "exact_duplicate", "notes.txt": "not_an_image"}
    assert rep["dropped_by_reason"] == {"unreadable": 3, "tiny": 1, "exact_duplicate": 1, "not_an_image": 1}
    assert rep["kept"] == 6 and len(ds.labels) == 6


def test_same_image_in_two_classes_is_dropped(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 2, "b": 2})
    (root / "b" / "dup.png").write_bytes((root / "a" / "000.png").read_bytes())
    ds, rep = clean(scan_sources([str(root)]), SPEC, min_side=8, phash_distance=0)
    assert rep["dropped_by_reason"] == {"conflicting_label": 2}
    assert len(ds.labels) == 3


def test_mixed_sizes_and_modes_are_normalised(tmp_path):
    root = tmp_path / "d"
    write(root / "a" / "grey.png", pattern(1, 20, channels=1))
    rgba = np.dstack([pattern(2, 30), np.full((30, 30), 128, np.uint8)])
    write(root / "a" / "rgba.png", rgba)
    write(root / "b" / "deep.png", pattern(3, 40).astype(np.uint16) * 257)
    write(root / "b" / "wide.jpg", cv2.resize(pattern(4, 24), (50, 25)))
    ds, rep = clean(scan_sources([str(root)]), SPEC, min_side=8, phash_distance=0)
    assert rep["kept"] == 4 and not rep["dropped"]
    assert ds.images.shape == (4, 16, 16, 3)
    # 16-bit is scaled down, not clipped: the 16-bit image equals its 8-bit source after resizing.
    i = ds.paths.index(str(root / "b" / "deep.png"))
    assert np.array_equal(ds.images[i], resize_to_input(pattern(3, 40), SPEC))


def test_near_duplicates_share_a_group_and_never_straddle_splits(tmp_path):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for cls, base in (("a", 0), ("b", 50)):
        for k in range(10):
            img = pattern(base + k, 48)
            write(root / cls / f"{k}.png", img)
            noisy = np.clip(img.astype(int) + rng.integers(-2, 3, img.shape), 0, 255).astype(np.uint8)
            write(root / cls / f"{k}_near.png", noisy)
    ds, rep = clean(scan_sources([str(root)]), SPEC, min_side=8, phash_distance=4)
    by_path = dict(zip(ds.paths, ds.groups.tolist()))
    for cls in ("a", "b"):
        for k in range(10):
            assert by_path[str(root / cls / f"{k}.png")] == by_path[str(root / cls / f"{k}_near.png")]
    assert rep["near_duplicate_groups"]["groups"] == 20
    tr, te = holdout_split(ds.labels, ds.groups, 0.25, seed=1)
    assert not set(ds.groups[tr]) & set(ds.groups[te])
    for a, b in kfold(ds.labels[tr], ds.groups[tr], 3, seed=1):
        assert not set(ds.groups[tr][a]) & set(ds.groups[tr][b])


def test_phash_groups_by_distance():
    a = pattern(1, 64)
    b = np.clip(a.astype(int) + 2, 0, 255).astype(np.uint8)
    c = pattern(2, 64)
    assert near_duplicate_groups([phash(a), phash(b), phash(c)], 4) == [0, 0, 1]


def test_kfold_is_stratified():
    labels = np.array([0] * 40 + [1] * 20)
    groups = np.arange(60)
    for _tr, va in kfold(labels, groups, 5, seed=0):
        assert (labels[va] == 0).sum() == 8 and (labels[va] == 1).sum() == 4


@pytest.mark.parametrize("case", ["empty", "missing", "one_class", "only_junk"])
def test_bad_data_folders(tmp_path, case):
    root = tmp_path / "d"
    root.mkdir()
    if case == "missing":
        root = tmp_path / "nope"
    elif case == "one_class":
        class_folders(root, {"only": 5})
    elif case == "only_junk":
        (root / "a").mkdir()
        (root / "a" / "x.txt").write_text("x")
    with pytest.raises(DataError) as err:
        scan_sources([str(root)])
    msg = str(err.value)
    assert {"empty": "no images found", "missing": "does not exist", "one_class": "only one class",
            "only_junk": "no images found"}[case] in msg


def test_all_images_of_a_class_corrupt(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 3})
    (root / "b").mkdir()
    (root / "b" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="only 1 class"):
        clean(scan_sources([str(root)]), SPEC, min_side=8, phash_distance=0)


def test_too_few_images_per_class_for_the_folds(tmp_path):
    root = class_folders(tmp_path / "d", {"a": 10, "b": 3})
    ds, _ = clean(scan_sources([str(root)]), SPEC, min_side=8, phash_distance=0)
    with pytest.raises(DataError, match="class 'b' has only 3"):
        check_enough(ds, folds=5)
    check_enough(ds, folds=3)
