"""Labelling frames: the one function the HTTP layer / dashboard calls, with the label-name rules.

A label becomes a class folder name in the export (hub.export) and a class name in training, so it
must be safe as a folder name on every OS: 1-64 characters from letters, digits, '_', '-' and '.',
starting with a letter or digit (so never '.', '..' or a hidden name). Labels are case-sensitive.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Optional

from hub.errors import LabelError as LabelError  # defined in hub.errors, importable from here too
from hub.errors import NotFound
from hub.store.base import FrameRecord, Store

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Names Windows refuses as file names (a dataset may be copied there).
_RESERVED = ({"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)}
             | {f"lpt{i}" for i in range(1, 10)})


def validate_label(label: str) -> str:
    """Return ``label`` if it is a safe class name; LabelError with the rules otherwise."""
    if not isinstance(label, str) or not LABEL_RE.match(label) or label.split(".")[0].lower() in _RESERVED:
        raise LabelError(f"invalid label {label!r}: use 1-64 characters from letters, digits, '_', '-', '.', "
                         "starting with a letter or digit (it becomes a folder name in the export)")
    return label


def set_label(store: Store, frame_id: str, label: Optional[str],
              clock: Callable[[], float] = time.time) -> FrameRecord:
    """Label a frame (``None`` or "" clears the label); returns the updated record (without image).

    LabelError for an invalid name, NotFound for an unknown frame id.
    """
    value = None if label is None or label == "" else validate_label(label)
    if not frame_id:
        raise NotFound("frame_id is required")
    if not store.set_label(frame_id, value, int(clock() * 1000)):
        raise NotFound(f"frame {frame_id!r} does not exist")
    rec = store.get_frame(frame_id)
    if rec is None:  # pragma: no cover - deleted between the two calls
        raise NotFound(f"frame {frame_id!r} does not exist")
    return rec
