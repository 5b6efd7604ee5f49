"""The MongoDB store's dashboard half (as hub/store/sqlite_web.py for SQLite): labels with who and
when, the keyset frame query, the telemetry series, API tokens and sessions.

Collections: ``series`` (unique on (device_id, minute_ms)), ``tokens`` (unique on name and on
token_hash), ``sessions`` (unique on id_hash); frames carry ``top_score`` (indexed with frame_id,
alone and after label, as the label queue's orders need).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from hub.store.authrecords import SessionRecord, TokenRecord
from hub.store.query import UNUSABLE_LABEL, FramePage, FrameQuery, page_of, top_score
from hub.store.series import SeriesPoint

if TYPE_CHECKING:  # pragma: no cover
    from hub.store.base import FrameRecord

DUPLICATE_KEY = 11000
BACKFILL_PAGE = 500


def frame_filter(q: FrameQuery) -> Dict[str, Any]:
    """The query document of a FrameQuery (without its order)."""
    parts: List[Dict[str, Any]] = []
    if q.device_ids is not None:
        parts.append({"device_id": {"$in": list(q.device_ids)}})
    for key, value in (("model_name", q.model_name), ("model_version", q.model_version), ("label", q.label),
                       ("reasons", q.reason)):
        if value is not None:
            parts.append({key: value})
    score: Dict[str, float] = {}
    if q.min_score is not None:
        score["$gte"] = float(q.min_score)
    if q.max_score is not None:
        score["$lt"] = float(q.max_score)
    if score:
        parts.append({"top_score": score})
    if q.label_state == "unlabelled":
        parts.append({"label": None})
    elif q.label_state == "labelled":
        parts.append({"label": {"$nin": [None, UNUSABLE_LABEL]}})
    elif q.label_state == "unusable":
        parts.append({"label": UNUSABLE_LABEL})
    when: Dict[str, int] = {}
    if q.since_ms is not None:
        when["$gte"] = int(q.since_ms)
    if q.until_ms is not None:
        when["$lt"] = int(q.until_ms)
    if when:
        parts.append({"capture_time_ms": when})
    after = q.cursor()
    if after is not None:
        at, last_id = after
        if q.order == "newest":
            parts.append({"$or": [{"capture_time_ms": {"$lt": at}}, {"capture_time_ms": at,
                                                                     "frame_id": {"$lt": last_id}}]})
        else:
            parts.append({"$or": [{"top_score": {"$gt": at}}, {"top_score": at, "frame_id": {"$gt": last_id}}]})
    return {"$and": parts} if parts else {}


class MongoWebMixin:
    """Mixed into MongoStore (its collections, the error translation of hub.store.mongo._wrapped)."""

    if TYPE_CHECKING:  # pragma: no cover - provided by MongoStore
        db: Any
        frames: Any
        _pymongo: Any

        def _to_frame(self, doc: Dict[str, Any], with_image: bool) -> FrameRecord: ...

    def _web_setup(self) -> None:
        p = self._pymongo
        self.series = self.db["series"]
        self.tokens = self.db["tokens"]
        self.sessions = self.db["sessions"]
        self.frames.create_index([("top_score", p.ASCENDING), ("frame_id", p.ASCENDING)])
        self.frames.create_index([("label", p.ASCENDING), ("top_score", p.ASCENDING), ("frame_id", p.ASCENDING)])
        self.series.create_index([("device_id", p.ASCENDING), ("minute_ms", p.ASCENDING)], unique=True)
        self.series.create_index([("minute_ms", p.ASCENDING)])
        self.tokens.create_index([("name", p.ASCENDING)], unique=True)
        self.tokens.create_index([("token_hash", p.ASCENDING)], unique=True)
        self.sessions.create_index([("id_hash", p.ASCENDING)], unique=True)
        self._backfill_top_scores()

    def _backfill_top_scores(self) -> None:
        """Frames an older hub stored have no top_score: computed once, in pages."""
        while True:
            docs = list(self.frames.find({"top_score": {"$exists": False}}, {"frame_id": 1, "top_k": 1})
                        .limit(BACKFILL_PAGE))
            if not docs:
                return
            self.frames.bulk_write([self._pymongo.UpdateOne({"_id": d["_id"]}, {"$set": {
                "top_score": top_score(d.get("top_k") or [])}}) for d in docs], ordered=False)

    # ---- labels ----
    def _set_labels(self, labels: Dict[str, Optional[str]], when_ms: int, by: str) -> Dict[str, Optional[str]]:
        if not labels:
            return {}
        before = {d["frame_id"]: d.get("label") for d in
                  self.frames.find({"frame_id": {"$in": sorted(labels)}}, {"frame_id": 1, "label": 1})}
        ops = [self._pymongo.UpdateOne({"frame_id": fid}, {"$set": {
            "label": label, "labelled_ms": None if label is None else int(when_ms),
            "labelled_by": "" if label is None else by}}) for fid, label in labels.items() if fid in before]
        if ops:
            self.frames.bulk_write(ops, ordered=False)
        return before

    # ---- the frame query ----
    def _query_frames(self, query: FrameQuery) -> FramePage:
        q = query.validate()
        sort = [("capture_time_ms", -1), ("frame_id", -1)] if q.order == "newest" else \
            [("top_score", 1), ("frame_id", 1)]
        cur = self.frames.find(frame_filter(q), {"image": 0}).sort(sort).limit(q.limit + 1)
        return page_of(q, [self._to_frame(d, False) for d in cur])

    # ---- telemetry series ----
    def _series_ops(self, points: Sequence[SeriesPoint]) -> List[Any]:
        """Upserts that never replace a later point: the filter matches only an older one, and when a
        later one exists the upsert's insert hits the unique index (ignored, see _write_series)."""
        return [self._pymongo.UpdateOne({"device_id": p.device_id, "minute_ms": int(p.minute_ms),
                                         "time_ms": {"$lte": int(p.time_ms)}}, {"$set": p.to_doc()}, upsert=True)
                for p in points]

    def _write_series(self, points: Sequence[SeriesPoint]) -> None:
        from pymongo.errors import BulkWriteError
        if not points:
            return
        try:
            self.series.bulk_write(self._series_ops(points), ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors") or any(
                    e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise

    def _list_series(self, since_ms: int, until_ms: Optional[int],
                     device_ids: Optional[List[str]]) -> List[SeriesPoint]:
        minute: Dict[str, int] = {"$gte": int(since_ms)}
        if until_ms is not None:
            minute["$lt"] = int(until_ms)
        q: Dict[str, Any] = {"minute_ms": minute}
        if device_ids is not None:
            q["device_id"] = {"$in": list(device_ids)}
        return [SeriesPoint.from_doc(d) for d in self.series.find(q, {"_id": 0})
                .sort([("device_id", 1), ("minute_ms", 1)])]

    # ---- tokens and sessions ----
    @staticmethod
    def _token(doc: Optional[Dict[str, Any]]) -> Optional[TokenRecord]:
        if doc is None:
            return None
        names = {f.name for f in dataclasses.fields(TokenRecord)}
        return TokenRecord(**{k: v for k, v in doc.items() if k in names})

    def _add_token(self, token: TokenRecord) -> bool:
        from pymongo.errors import DuplicateKeyError
        existing = self.tokens.find_one({"name": token.name})
        if existing is not None and int(existing.get("revoked_ms", 0)) == 0:
            return False
        try:
            if existing is not None:  # only a revoked token is replaced, and only if still revoked
                res = self.tokens.replace_one({"name": token.name, "revoked_ms": {"$ne": 0}},
                                              dataclasses.asdict(token))
                return bool(res.matched_count == 1)
            self.tokens.insert_one(dataclasses.asdict(token))
        except DuplicateKeyError:
            return False
        return True

    def _add_session(self, session: SessionRecord) -> None:
        self.sessions.replace_one({"id_hash": session.id_hash}, dataclasses.asdict(session), upsert=True)

    def _get_session(self, id_hash: str) -> Optional[SessionRecord]:
        doc = self.sessions.find_one({"id_hash": id_hash}, {"_id": 0})
        return SessionRecord(**doc) if doc else None
