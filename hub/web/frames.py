"""The label queue's filters as query parameters (one parser for the page and the JSON API), a frame as
JSON, and the class names offered for labelling.

Parameters (all optional; empty = no condition): ``device``, ``group``, ``model`` (name),
``version``, ``reason`` (LOW_CONFIDENCE, LOW_MARGIN, HIGH_ENTROPY, TRIAL), ``min_score``, ``below``
(top-1 score under it), ``state`` (unlabelled [default], labelled, unusable, any), ``label``,
``since`` / ``until`` (ISO date-time in UTC, or epoch ms), ``order`` (newest [default],
least_confident), ``limit``, ``after`` (the ``next`` cursor of the previous page).
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Mapping, Optional
from urllib.parse import quote

from hub.cli.export import parse_since
from hub.errors import ConfigError
from hub.store.base import FrameRecord, ModelRecord, Store
from hub.store.query import UNUSABLE_LABEL, FrameQuery, QueryError, top_score

FILTER_KEYS = ("device", "group", "model", "version", "reason", "min_score", "below", "state", "label", "since",
               "until", "order")


def _number(params: Mapping[str, str], key: str, kind: type) -> Any:
    text = (params.get(key) or "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise QueryError(f"{key} must be a{'n integer' if kind is int else ' number'}, not {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise QueryError(f"{key} must be a finite number")
    return value


def _time(params: Mapping[str, str], key: str) -> Optional[int]:
    text = (params.get(key) or "").strip()
    try:
        return parse_since(text) if text else None
    except ConfigError:
        raise QueryError(f"{key} must be an ISO date-time (UTC) like 2026-01-31T12:00 or epoch ms, "
                         f"not {text!r}") from None


def filters_of(params: Mapping[str, str]) -> Dict[str, str]:
    """The non-empty filter parameters (to rebuild links: next page, thumbnails' context)."""
    return {k: str(params[k]).strip() for k in FILTER_KEYS if str(params.get(k) or "").strip()}


def query_of(params: Mapping[str, str], store: Store, default_limit: int) -> FrameQuery:
    """A FrameQuery from query parameters; QueryError (400) naming a bad one."""
    device_ids: Optional[List[str]] = None
    device = (params.get("device") or "").strip()
    group = (params.get("group") or "").strip()
    if device:
        device_ids = [device]
    if group:
        in_group = [d.device_id for d in store.list_devices(group)]
        device_ids = [d for d in (device_ids or in_group) if d in in_group]
    limit = _number(params, "limit", int)
    q = FrameQuery(
        device_ids=device_ids, model_name=(params.get("model") or "").strip() or None,
        model_version=_number(params, "version", int), reason=(params.get("reason") or "").strip() or None,
        min_score=_number(params, "min_score", float), max_score=_number(params, "below", float),
        label_state=(params.get("state") or "unlabelled").strip(), label=(params.get("label") or "").strip() or None,
        since_ms=_time(params, "since"), until_ms=_time(params, "until"),
        order=(params.get("order") or "newest").strip(), limit=default_limit if limit is None else limit,
        after=(params.get("after") or "").strip() or None)
    return q.validate()


def frame_path(frame_id: str) -> str:
    return quote(frame_id, safe="")


def frame_json(f: FrameRecord, groups: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """A frame as the API shows it (no image bytes: ``image_url`` / ``thumb_url``)."""
    label = f.label
    return {
        "frame_id": f.frame_id, "device_id": f.device_id, "group": (groups or {}).get(f.device_id, ""),
        "capture_time_ms": f.capture_time_ms, "received_ms": f.received_ms, "model_name": f.model_name,
        "model_version": f.model_version, "reasons": list(f.reasons), "top_k": list(f.top_k),
        "top_score": top_score(f.top_k), "label": None if label == UNUSABLE_LABEL else label,
        "unusable": label == UNUSABLE_LABEL, "labelled_ms": f.labelled_ms, "labelled_by": f.labelled_by,
        "width": f.width, "height": f.height, "image_format": f.image_format, "source": f.source,
        "image_url": f"/frames/{frame_path(f.frame_id)}/image", "thumb_url": f"/frames/{frame_path(f.frame_id)}/thumb",
    }


def class_names(frames: List[FrameRecord], models: List[ModelRecord]) -> List[str]:
    """The classes offered for labelling: those of the model versions the frames come from (the newest
    version first, manifest order), then any other class the frames' top-k name (sorted)."""
    out: List[str] = []
    wanted = {(f.model_name, f.model_version) for f in frames}
    names = {f.model_name for f in frames}
    ranked = sorted(models, key=lambda m: ((m.model_name, m.version) not in wanted, m.model_name not in names,
                                           -m.version))
    for m in ranked:
        if m.model_name in names or not frames:
            out.extend(c for c in m.labels if c not in out)
    seen = {str(t.get("label", "")) for f in frames for t in f.top_k}
    return out + sorted(c for c in seen if c and c not in out)


def when(ms: Optional[int]) -> str:
    """A UTC time for people (the dashboard shows UTC everywhere)."""
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def ago(ms: Optional[int], now_ms: int) -> str:
    if not ms:
        return "never"
    s = max(0, (now_ms - int(ms)) // 1000)
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m ago"
    return f"{s // 86400}d ago"
