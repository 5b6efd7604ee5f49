"""The dashboard's frame query (the label queue, ``kestrel-hub frames``, the JSON API): filters, two
orders and keyset pagination, answered alike by every backend (tests/hub/test_store_contract.py).

Keyset, not offset: a page is "the next ``limit`` frames after this one in this order", so a page
deep in 100,000 frames costs what the first one costs, and frames labelled (or arriving) meanwhile
never make a page skip or repeat a frame. The cursor is opaque to clients: the sort key of the last
frame of a page and its frame_id (the tie-breaker), as URL-safe base64 of a JSON array.

The top-1 score a frame is ordered and filtered by is the highest score of its ``top_k``
(``top_score``; 0.0 for a frame without scores); backends store it next to the frame so it can be
indexed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from hub.errors import QueryError as QueryError  # defined in hub.errors, importable from here too

UNUSABLE_LABEL = "_unusable"  # a person's verdict "not usable for training"; never a class (no leading '_')
LABEL_STATES = ("unlabelled", "labelled", "unusable", "any")
ORDERS = ("newest", "least_confident")
MAX_LIMIT = 500
REASONS = ("LOW_CONFIDENCE", "LOW_MARGIN", "HIGH_ENTROPY", "TRIAL")  # proto SampleReason names


def top_score(top_k: Sequence[Dict[str, Any]]) -> float:
    """The highest score of a frame's top-k (0.0 when it has none or none is a finite number)."""
    best = 0.0
    found = False
    for t in top_k or ():
        try:
            s = float(t.get("score", 0.0))
        except (TypeError, ValueError, AttributeError):
            continue
        if math.isfinite(s) and (not found or s > best):
            best, found = s, True
    return best


@dataclasses.dataclass
class FrameQuery:
    """Which frames, in which order, from where. ``None`` = no condition."""
    device_ids: Optional[List[str]] = None  # the frame's device is one of these ([] matches nothing)
    model_name: Optional[str] = None
    model_version: Optional[int] = None
    reason: Optional[str] = None            # one of REASONS: the frame was sampled for it (among others)
    min_score: Optional[float] = None       # top-1 score >= min_score
    max_score: Optional[float] = None       # top-1 score < max_score ("below")
    label_state: str = "unlabelled"         # one of LABEL_STATES ("labelled" excludes UNUSABLE_LABEL)
    label: Optional[str] = None             # exactly this label (with label_state "labelled" or "any")
    since_ms: Optional[int] = None          # capture_time_ms >= since_ms
    until_ms: Optional[int] = None          # capture_time_ms < until_ms
    order: str = "newest"                   # newest: capture time desc; least_confident: top-1 score asc
    limit: int = 48
    after: Optional[str] = None             # the cursor of the previous page (FramePage.next)

    def validate(self) -> FrameQuery:
        if self.order not in ORDERS:
            raise QueryError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.label_state not in LABEL_STATES:
            raise QueryError(f"label state must be one of {', '.join(LABEL_STATES)}, not {self.label_state!r}")
        if not 1 <= int(self.limit) <= MAX_LIMIT:
            raise QueryError(f"limit must be between 1 and {MAX_LIMIT}, not {self.limit}")
        if self.reason is not None and self.reason not in REASONS:
            raise QueryError(f"reason must be one of {', '.join(REASONS)}, not {self.reason!r}")
        for name in ("min_score", "max_score"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(float(v)):
                raise QueryError(f"{name} must be a finite number")
        if self.label is not None and self.label_state in ("unlabelled", "unusable"):
            raise QueryError(f"a label filter needs label state 'labelled' or 'any', not {self.label_state!r}")
        self.cursor()  # a bad cursor is refused before any backend sees it
        return self

    def cursor(self) -> Optional[Tuple[Union[int, float], str]]:
        """The decoded ``after`` cursor: (sort key, frame_id) of the last frame of the previous page."""
        if not self.after:
            return None
        try:
            raw = base64.urlsafe_b64decode(self.after.encode("ascii") + b"=" * (-len(self.after) % 4))
            key, frame_id, order = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeError, binascii.Error, TypeError) as exc:
            raise QueryError("the page cursor is not one this hub made; start from the first page") from exc
        if order != self.order or not isinstance(frame_id, str) or isinstance(key, bool) \
                or not isinstance(key, (int, float)):
            raise QueryError("the page cursor belongs to another order; start from the first page")
        return (int(key) if self.order == "newest" else float(key)), frame_id


def make_cursor(order: str, key: Union[int, float], frame_id: str) -> str:
    raw = json.dumps([key, frame_id, order], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def sort_key(order: str, frame: Any) -> Union[int, float]:
    return int(frame.capture_time_ms) if order == "newest" else top_score(frame.top_k)


@dataclasses.dataclass
class FramePage:
    frames: List[Any]               # FrameRecord, without images
    next: Optional[str] = None      # cursor of the next page; None on the last page


def page_of(q: FrameQuery, rows: List[Any]) -> FramePage:
    """A page from up to limit + 1 rows in order (the extra row only says that there is a next page)."""
    more = len(rows) > q.limit
    rows = rows[:q.limit]
    nxt = make_cursor(q.order, sort_key(q.order, rows[-1]), rows[-1].frame_id) if more and rows else None
    return FramePage(rows, nxt)
