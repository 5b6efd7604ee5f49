"""Ingestion and cleaning: class folders (Keras image_dataset_from_directory layout, or a hub export:
the same plus an optional manifest.json) -> one cleaned, grouped, split data set in the run dir.

Cleaning drops unreadable/truncated files, tiny images and exact duplicates (sha256 of the decoded
pixels), and groups near duplicates (64-bit DCT perceptual hash within ``phash_distance`` bits) so a
group always lands on one side of every split. Every drop is recorded with its reason; near duplicates
filed under different classes are reported as label conflicts. Hidden files and folders (``.git``,
``.ipynb_checkpoints`` ...) are skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge.inference import phash  # the same 64-bit DCT hash the edge sampler uses
from proto.inputspec import InputSpec
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
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(cdir).parts):
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


# Above this distance the pigeonhole chunks get too short to narrow anything: compare all pairs.
MAX_BUCKETED_DISTANCE = 15


def _candidate_blocks(h: np.ndarray, max_distance: int) -> List[np.ndarray]:
    """Index sets whose members may be within max_distance bits of each other.

    Pigeonhole: cut the 64 bits into max_distance + 1 chunks; two hashes differing in at most
    max_distance bits agree exactly on at least one chunk. So only items sharing a chunk value are
    compared: about n log n work on real data instead of n^2 (identical chunks, e.g. many blank
    images, still compare within their bucket)."""
    n = len(h)
    if max_distance > MAX_BUCKETED_DISTANCE:
        return [np.arange(n)]
    bounds = np.linspace(0, 64, max_distance + 2).astype(int)
    blocks = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        cuts = np.nonzero(ks[1:] != ks[:-1])[0] + 1
        for run in np.split(order, cuts):
            if len(run) > 1:
                blocks.append(run)
    return blocks


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
    for block in _candidate_blocks(h, max_distance):
        hb = h[block]
        for k in range(len(block) - 1):
            d = _popcount64(hb[k + 1:] ^ hb[k])
            for j in np.nonzero(d <= max_distance)[0]:
                a, b = find(int(block[k])), find(int(block[k + 1 + int(j)]))
                if a != b:
                    parent[b] = a
    roots: Dict[int, int] = {}
    return [roots.setdefault(find(i), len(roots)) for i in range(n)]


def label_conflicts(groups: Sequence[int], labels: Sequence[str], paths: Sequence[str]) -> List[Dict[str, Any]]:
    """Near-duplicate groups whose images are filed under more than one class (likely labelling mistakes)."""
    by_group: Dict[int, List[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(int(g), []).append(i)
    out = []
    for g, idx in sorted(by_group.items()):
        if len({labels[i] for i in idx}) > 1:
            out.append({"group": g, "files": [{"path": paths[i], "label": labels[i]} for i in idx]})
    return out


@dataclass
class Dataset:
    images: np.ndarray          # N x H x W x C uint8, model colour order, resized
    labels: np.ndarray          # N int
    groups: np.ndarray          # N int (near-duplicate groups)
    class_names: List[str]
    paths: List[str]

    def to_bytes(self) -> bytes:
        """The .npz bytes (what :meth:`save` writes)."""
        buf = io.BytesIO()
        np.savez_compressed(buf, images=self.images, labels=self.labels, groups=self.groups,
                            class_names=np.array(self.class_names), paths=np.array(self.paths))
        return buf.getvalue()

    def save(self, path: Path) -> None:
        """Atomically (proto.atomic: temp file, fsync, rename)."""
        from proto.atomic import write_bytes

        write_bytes(path, self.to_bytes())

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
    conflicts_near = label_conflicts(groups, [c.label for c in kept], [str(c.path) for c in kept])
    warnings = list(scan.warnings)
    if conflicts_near:
        warnings.append(f"{len(conflicts_near)} near-duplicate group(s) hold images of different classes "
                        "(see near_duplicate_label_conflicts): check those labels")
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
        "warnings": warnings,
        "seen": len(scan.candidates) + len(scan.dropped),
        "kept": len(kept),
        "classes": {name: int((labels == i).sum()) for i, name in enumerate(class_names)},
        "dropped_by_reason": reasons,
        "dropped": [d.__dict__ for d in dropped],
        "near_duplicate_groups": {"groups": n_groups, "images_in_shared_groups": int(len(kept) - n_groups)},
        "near_duplicate_label_conflicts": conflicts_near[:200],
        "original_sizes": dict(sorted(modes.items(), key=lambda kv: -kv[1])[:20]),
    }
    return ds, report


def check_enough(ds: Dataset, folds: int, min_per_class: Optional[int] = None) -> None:
    """Each class needs enough independent groups for the test split (>= 1) and the k folds (>= k on the
    training side). A quick lower bound before splitting; trainer.split.check_split checks the real split."""
    need = (folds + 1 if folds >= 2 else 2) if min_per_class is None else min_per_class
    for i, name in enumerate(ds.class_names):
        n = len(set(ds.groups[ds.labels == i].tolist()))
        if n < need:
            raise DataError(f"class {name!r} has only {n} distinct image(s) (near duplicates count once); "
                            f"need at least {need} for a test split and {folds}-fold cross-validation: add images "
                            "or lower --folds")
