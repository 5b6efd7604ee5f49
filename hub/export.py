"""Export labelled frames as a training data set: one folder per class plus manifest.json.

Layout (Keras ``image_dataset_from_directory``; trainer.ingest reads it as is)::

    OUT/
      manifest.json          {"schema": 1, "exported_ms", "since_ms", "min_per_class", "classes": {label: n},
                              "skipped_classes": {label: n}, "unusable": n, "frames": [{frame_id, device_id,
                              label, file, sha256, capture_time_ms, model_name, model_version, width, height,
                              labelled_by, labelled_ms}]}
      <label>/<frame file>   the image bytes exactly as the device sent them (.jpg / .png)

Frames a person marked unusable (hub.labels.UNUSABLE) are not exported; the manifest counts them.

Atomic: everything is written into a hidden temp dir next to OUT, fsynced, then renamed into place.
An existing OUT is refused unless ``force``; even then only a previous export (it has manifest.json)
or an empty dir is replaced, never an unrelated folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hub.errors import ExportError as ExportError  # defined in hub.errors, importable from here too
from hub.errors import LabelError
from hub.labels import UNUSABLE, validate_label
from hub.store.base import FrameRecord, Store
from proto.atomic import fsync_dir
from proto.clock import now_ms

log = logging.getLogger(__name__)

SCHEMA = 1
MANIFEST = "manifest.json"
_EXT = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    frames: int
    classes: Dict[str, int]
    skipped_classes: Dict[str, int]


def _file_name(frame: FrameRecord) -> str:
    """A safe, unique file name for a frame id (unsafe characters replaced; a hash keeps it unique)."""
    ext = _EXT.get(frame.image_format.lower())
    if ext is None:
        raise ExportError(f"frame {frame.frame_id!r} has image format {frame.image_format!r}; "
                          "only jpeg and png can be exported")
    safe = _UNSAFE.sub("_", frame.frame_id).lstrip(".")[:100]
    if safe != frame.frame_id or not safe:
        safe = f"{safe}-{hashlib.sha256(frame.frame_id.encode()).hexdigest()[:12]}"
    return safe + ext


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_target(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another --out")
    if not force:
        raise ExportError(f"{out} exists already; pass --force to replace it or choose another --out")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"{out} is not empty and is not a previous export (no {MANIFEST}); refusing to "
                          "replace it even with --force")


def export_dataset(store: Store, out_dir: str | os.PathLike[str], since_ms: Optional[int] = None,
                   min_per_class: int = 0, force: bool = False) -> ExportResult:
    """Write every labelled frame (captured at/after ``since_ms``) to ``out_dir``; see the module doc.

    Classes with fewer than ``min_per_class`` frames are left out (listed in skipped_classes).
    """
    out = Path(out_dir).expanduser().absolute()
    _check_target(out, force)
    if min_per_class < 0:
        raise ExportError("--min-per-class must be >= 0")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        by_label, unusable = _write_frames(store, tmp, since_ms)  # streams: one image in memory at a time
        # Case-insensitive file systems would merge "Cat" and "cat".
        lowered: Dict[str, str] = {}
        for label in sorted(by_label):
            other = lowered.setdefault(label.lower(), label)
            if other != label:
                raise ExportError(f"labels {other!r} and {label!r} differ only in case; they would share a "
                                  "folder on some systems - relabel one of them")
        skipped = {k: len(v) for k, v in sorted(by_label.items()) if len(v) < min_per_class}
        for label in skipped:
            shutil.rmtree(tmp / label)
        kept = {k: v for k, v in sorted(by_label.items()) if k not in skipped}
        if not kept:
            raise ExportError("no labelled frames to export" + (f" with at least {min_per_class} per class"
                                                               if by_label else "") + "; label frames first")
        entries = [e for label in kept for e in kept[label]]
        classes = {k: len(v) for k, v in kept.items()}
        manifest = {"schema": SCHEMA, "exported_ms": now_ms(), "since_ms": since_ms,
                    "min_per_class": min_per_class, "classes": classes, "skipped_classes": skipped,
                    "unusable": unusable, "frames": entries}
        _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        fsync_dir(tmp)
        os.chmod(tmp, 0o755)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, len(entries), classes, skipped)


def _write_frames(store: Store, tmp: Path, since_ms: Optional[int]) -> Tuple[Dict[str, List[Dict[str, object]]],
                                                                             int]:
    """Write each labelled frame's image into tmp/<label>/; manifest entries by label, and how many
    frames were marked unusable (not written)."""
    by_label: Dict[str, List[Dict[str, object]]] = {}
    unusable = 0
    for frame in store.iter_labelled():
        if not frame.label or (since_ms is not None and frame.capture_time_ms < since_ms):
            continue
        label = frame.label
        if label == UNUSABLE:
            unusable += 1
            continue
        try:
            validate_label(label)
        except LabelError as exc:
            raise ExportError(f"frame {frame.frame_id!r}: {exc}; relabel it before exporting") from exc
        cdir = tmp / label
        if label not in by_label:
            cdir.mkdir()
            by_label[label] = []
        name = _file_name(frame)
        _write_file(cdir / name, frame.image)
        by_label[label].append({"frame_id": frame.frame_id, "device_id": frame.device_id, "label": label,
                                "file": f"{label}/{name}", "sha256": hashlib.sha256(frame.image).hexdigest(),
                                "capture_time_ms": frame.capture_time_ms, "model_name": frame.model_name,
                                "model_version": frame.model_version, "width": frame.width,
                                "height": frame.height, "labelled_by": frame.labelled_by,
                                "labelled_ms": frame.labelled_ms})
    for label in by_label:
        fsync_dir(tmp / label)
    return by_label, unusable


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing (checked) out is moved aside first and removed after."""
    old: Optional[Path] = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{now_ms()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
