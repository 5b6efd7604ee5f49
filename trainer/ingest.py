"""Ingestion and cleaning: class folders (Keras image_dataset_from_directory layout, or a hub export:
the same plus an optional manifest.json) -> one cleaned, grouped, split data set in the run dir.

Cleaning drops unreadable/truncated files, tiny images and exact duplicates (sha256 of the decoded
pixels), and groups near duplicates (64-bit DCT perceptual hash within ``phash_distance`` bits) so a
group always lands on one side of every split. Every drop is recorded with its reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge.inputspec import InputSpec
from edge.phash import phash  # the same 64-bit DCT hash the edge sampler uses
from trainer.errors import DataError
from trainer.imageio import is_image_name, read_image
from trainer.preprocess import resize_to_input


@dataclass
class Candidate:
    path: Path
    label: str
    source: str


@dataclass
class Dropped:
    path: str
    label: str
    reason: str
    detail: str = ""


@dataclass
class Scan:
    candidates: List[Candidate] = field(default_factory=list)
    dropped: List[Dropped] = field(default_factory=list)
    manifests: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


def scan_sources(sources: Sequence[str]) -> Scan:
    """List class folders of every source (merged by class name); cheap checks only."""
    if not sources:
        raise DataError("no --data folder given: pass --data DIR (one sub-folder per class)")
    scan = Scan()
    for src in sources:
        root = Path(src)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist or is not a directory")
        manifest = root / "manifest.json"
        if manifest.is_file():
            try:
                meta = json.loads(manifest.read_text("utf-8"))
                frames = meta.get("frames", []) if isinstance(meta, dict) else meta
                scan.manifests[str(root)] = {"frames": len(frames) if isinstance(frames, list) else 0}
            except (OSError, ValueError) as exc:
                scan.warnings.append(f"{manifest}: ignored unreadable manifest ({exc})")
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for cdir in classes:
            for f in sorted(cdir.rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                if not is_image_name(f):
                    scan.dropped.append(Dropped(str(f), cdir.name, "not_an_image", f"extension {f.suffix!r}"))
                    continue
                scan.candidates.append(Candidate(f, cdir.name, str(root)))
    labels = sorted({c.label for c in scan.candidates})
    if not scan.candidates:
        raise DataError(
            f"no images found in {', '.join(sources)}: expected one sub-folder per class with image files "
            "(e.g. DATA/cat/001.png, DATA/dog/002.jpg)")
    if len(labels) < 2:
        raise DataError(f"only one class ({labels[0]!r}) found in {', '.join(sources)}: a classifier needs at "
                        "least two class folders")
    return scan


def _popcount64(x: np.ndarray) -> np.ndarray:
    b = x.view(np.uint8).reshape(*x.shape, 8)
    return np.unpackbits(b, axis=-1).sum(axis=-1)


def near_duplicate_groups(hashes: Sequence[int], max_distance: int) -> List[int]:
    """Union-find groups of items whose hashes are within max_distance bits; returns a group id per item."""
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    h = np.array(hashes, dtype=np.uint64)
    for i in range(n - 1):
        d = _popcount64(h[i + 1:] ^ h[i])
        for j in np.nonzero(d <= max_distance)[0]:
            a, b = find(i), find(i + 1 + int(j))
            if a != b:
                parent[b] = a
    roots: Dict[int, int] = {}
    return [roots.setdefault(find(i), len(roots)) for i in range(n)]


@dataclass
class Dataset:
    images: np.ndarray          # N x H x W x C uint8, model colour order, resized
    labels: np.ndarray          # N int
    groups: np.ndarray          # N int (near-duplicate groups)
    class_names: List[str]
    paths: List[str]

    def save(self, path: Path) -> None:
        np.savez_compressed(path, images=self.images, labels=self.labels, groups=self.groups,
                            class_names=np.array(self.class_names), paths=np.array(self.paths))

    @classmethod
    def load(cls, path: Path) -> Dataset:
        z = np.load(path, allow_pickle=False)
        return cls(z["images"], z["labels"], z["groups"], [str(c) for c in z["class_names"]],
                   [str(p) for p in z["paths"]])


def clean(scan: Scan, spec: InputSpec, min_side: int, phash_distance: int,
          progress: Any = None) -> Tuple[Dataset, Dict[str, Any]]:
    kept_imgs: List[np.ndarray] = []
    kept: List[Candidate] = []
    hashes: List[int] = []
    by_sha: Dict[str, int] = {}
    conflicts: set = set()
    dropped = list(scan.dropped)
    modes: Dict[str, int] = {}
    it = scan.candidates if progress is None else progress(scan.candidates, desc="ingest", unit="img")
    for cand in it:
        bgr, _raw, problem = read_image(cand.path)
        if bgr is None:
            dropped.append(Dropped(str(cand.path), cand.label, "unreadable", problem))
            continue
        h, w = bgr.shape[:2]
        if min(h, w) < min_side:
            dropped.append(Dropped(str(cand.path), cand.label, "tiny", f"{w}x{h} < min_side {min_side}"))
            continue
        modes[f"{w}x{h}"] = modes.get(f"{w}x{h}", 0) + 1
        sha = hashlib.sha256(bgr.tobytes() + str(bgr.shape).encode()).hexdigest()
        if sha in by_sha:
            first = kept[by_sha[sha]]
            if first.label != cand.label:
                conflicts.add(by_sha[sha])
                dropped.append(Dropped(str(cand.path), cand.label, "conflicting_label",
                                       f"same pixels as {first.path} labelled {first.label!r}"))
            else:
                dropped.append(Dropped(str(cand.path), cand.label, "exact_duplicate", f"same pixels as {first.path}"))
            continue
        by_sha[sha] = len(kept)
        kept.append(cand)
        kept_imgs.append(resize_to_input(bgr, spec))
        hashes.append(phash(bgr))
    if conflicts:
        for i in sorted(conflicts):
            dropped.append(Dropped(str(kept[i].path), kept[i].label, "conflicting_label",
                                   "the same image appears under another class"))
        keep = [i for i in range(len(kept)) if i not in conflicts]
        kept = [kept[i] for i in keep]
        kept_imgs = [kept_imgs[i] for i in keep]
        hashes = [hashes[i] for i in keep]
    class_names = sorted({c.label for c in kept})
    if len(class_names) < 2:
        raise DataError(f"after cleaning only {len(class_names)} class(es) with usable images remain "
                        f"({len(dropped)} files dropped; see the reasons above): need at least two")
    groups = near_duplicate_groups(hashes, phash_distance)
    labels = np.array([class_names.index(c.label) for c in kept], np.int64)
    ds = Dataset(np.stack(kept_imgs).astype(np.uint8), labels, np.array(groups, np.int64), class_names,
                 [str(c.path) for c in kept])
    reasons: Dict[str, int] = {}
    for d in dropped:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    n_groups = len(set(groups))
    report = {
        "sources": sorted({c.source for c in scan.candidates}),
        "manifests": scan.manifests,
        "warnings": scan.warnings,
        "seen": len(scan.candidates) + len(scan.dropped),
        "kept": len(kept),
        "classes": {name: int((labels == i).sum()) for i, name in enumerate(class_names)},
        "dropped_by_reason": reasons,
        "dropped": [d.__dict__ for d in dropped],
        "near_duplicate_groups": {"groups": n_groups, "images_in_shared_groups": int(len(kept) - n_groups)},
        "original_sizes": dict(sorted(modes.items(), key=lambda kv: -kv[1])[:20]),
    }
    return ds, report


def check_enough(ds: Dataset, folds: int, min_per_class: Optional[int] = None) -> None:
    """Each class needs enough independent groups for the test split and the k folds."""
    need = max(2, folds if folds >= 2 else 2) if min_per_class is None else min_per_class
    for i, name in enumerate(ds.class_names):
        n = len(set(ds.groups[ds.labels == i].tolist()))
        if n < need:
            raise DataError(f"class {name!r} has only {n} distinct image(s) (near duplicates count once); "
                            f"need at least {need} for a test split and {folds}-fold cross-validation: add images "
                            "or lower --folds")
