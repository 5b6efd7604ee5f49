"""Labelling frames: the functions the dashboard, the JSON API and the CLI call, with the label-name rules.

A label becomes a class folder name in the export (hub.export) and a class name in training, so it
must be safe as a folder name on every OS: 1-64 characters from letters, digits, '_', '-' and '.',
starting with a letter or digit (so never '.', '..' or a hidden name). Labels are case-sensitive.

One more value is accepted: ``UNUSABLE`` ("_unusable", which no class name can be): a person's
verdict that the frame is of no use for training (blurred, empty, broken). It counts as handled in
the label queue and is left out of the export. Every label records who set it (a token name) and when.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Dict, Optional

from hub.errors import LabelError as LabelError  # defined in hub.errors, importable from here too
from hub.errors import NotFound
from hub.store.base import FrameRecord, Store
from hub.store.query import UNUSABLE_LABEL

UNUSABLE = UNUSABLE_LABEL
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Names Windows refuses as file names (a dataset may be copied there).
_RESERVED = ({"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)}
             | {f"lpt{i}" for i in range(1, 10)})
MAX_BATCH = 1000  # frames labelled in one request at most


def validate_label(label: str) -> str:
    """Return ``label`` if it is a safe class name; LabelError with the rules otherwise."""
    if not isinstance(label, str) or not LABEL_RE.match(label) or label.split(".")[0].lower() in _RESERVED:
        raise LabelError(f"invalid label {label!r}: use 1-64 characters from letters, digits, '_', '-', '.', "
                         "starting with a letter or digit (it becomes a folder name in the export)")
    return label


def _value(label: Optional[str]) -> Optional[str]:
    """The stored value of a requested label: None/"" clear it; UNUSABLE passes; else a class name."""
    if label is None or label == "":
        return None
    return label if label == UNUSABLE else validate_label(label)


def set_labels(store: Store, labels: Dict[str, Optional[str]], by: str = "",
               clock: Callable[[], float] = time.time) -> Dict[str, Optional[str]]:
    """Label several frames at once (None or "" clears); returns each frame's previous label.

    Every label is checked before anything is written (LabelError). Ids the store does not know are
    raised as NotFound after the others were labelled (frames are never deleted: such an id is a typo).
    """
    if not labels:
        raise LabelError("no frames to label")
    if len(labels) > MAX_BATCH:
        raise LabelError(f"at most {MAX_BATCH} frames per request, not {len(labels)}")
    values = {}
    for frame_id, label in labels.items():
        if not frame_id:
            raise NotFound("frame_id is required")
        values[frame_id] = _value(label)
    before = store.set_labels(values, int(clock() * 1000), by)
    missing = [fid for fid in values if fid not in before]
    if missing:  # the store only labels the frames it has: say which ids it did not know
        others = f"; the other {len(before)} were labelled" if before else ""
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NotFound(f"frame {missing[0]!r} does not exist{more}{others}")
    return before


def set_label(store: Store, frame_id: str, label: Optional[str], by: str = "",
              clock: Callable[[], float] = time.time) -> FrameRecord:
    """Label a frame (``None`` or "" clears the label); returns the updated record (without image).

    LabelError for an invalid name, NotFound for an unknown frame id.
    """
    value = _value(label)
    if not frame_id:
        raise NotFound("frame_id is required")
    if not store.set_label(frame_id, value, int(clock() * 1000), by):
        raise NotFound(f"frame {frame_id!r} does not exist")
    rec = store.get_frame(frame_id)
    if rec is None:  # pragma: no cover - deleted between the two calls
        raise NotFound(f"frame {frame_id!r} does not exist")
    return rec
