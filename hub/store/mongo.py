"""MongoDB backend through pymongo: the production store behind several hub workers.

Collections ``frames`` (unique index on frame_id; the image in the document when it is under
INLINE_IMAGE_MAX bytes, else in GridFS bucket ``images`` with the document holding its id),
``devices``, ``groups`` (a group's desired state, unique on group) and ``models`` (unique on
(model_name, version)); the registry's bundles in GridFS bucket ``bundles`` (hub/store/blobs.py). Connection failures
(AutoReconnect, ServerSelectionTimeoutError, ...) become StoreUnavailable so the ingest pauses and
retries; other pymongo errors become StoreError.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

from hub.errors import StoreError, StoreUnavailable
from hub.store.authrecords import SessionRecord, TokenRecord
from hub.store.base import DeviceRecord, FrameRecord, GroupDesired, ModelRecord, Store
from hub.store.blobs import BlobMethods, GridBlobs
from hub.store.mongo_web import MongoWebMixin
from hub.store.query import FramePage, FrameQuery, top_score
from hub.store.series import SeriesPoint

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

INLINE_IMAGE_MAX = 15 * 1024 * 1024  # BSON documents are capped at 16 MiB
WRITE_CONCERN_W = "majority"  # with j=True: acknowledged writes are journaled on a majority
ITER_PAGE = 100  # iter_labelled reads this many frames (with images) per query
DEVICE_FIELDS = {f.name for f in dataclasses.fields(DeviceRecord)}
FRAME_FIELDS = [f.name for f in dataclasses.fields(FrameRecord)]


def _check_device_fields(fields: Dict[str, object]) -> None:
    unknown = sorted(set(fields) - DEVICE_FIELDS)
    if unknown or "device_id" in fields:
        raise StoreError(f"upsert_device: unknown or immutable field(s) {unknown or ['device_id']}")


def guarded(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` translating pymongo errors (and BSON encoding errors, e.g. DocumentTooLarge) at the boundary."""
    from bson.errors import BSONError
    from pymongo import errors as perr
    try:
        return fn()
    except (perr.AutoReconnect, perr.ServerSelectionTimeoutError, perr.NetworkTimeout,
            perr.ConnectionFailure, perr.ExecutionTimeout, perr.WTimeoutError,
            perr.WriteConcernError) as exc:  # majority + journal not confirmed: not durable yet
        raise StoreUnavailable(f"MongoDB unavailable during {what}: {exc}") from exc
    except (perr.PyMongoError, BSONError) as exc:  # GridFS's errors are PyMongoErrors too
        raise StoreError(f"MongoDB error during {what}: {exc}") from exc


def _wrapped(fn: F) -> F:
    """``guarded`` as a decorator."""
    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        return guarded(lambda: fn(*args, **kwargs), fn.__name__)
    return inner  # type: ignore[return-value]


class MongoStore(MongoWebMixin, BlobMethods, Store):
    """``MongoStore(url)`` connects; ``MongoStore.from_client(client)`` wraps an existing pymongo-style client."""

    def __init__(self, url: str, database: str = "", timeout_ms: int = 5000) -> None:
        import pymongo
        from pymongo import uri_parser

        try:
            parsed = uri_parser.parse_uri(url)
        except Exception as exc:  # pymongo raises InvalidURI/ConfigurationError/ValueError
            raise StoreError(f"not a usable MongoDB URL {url!r}: {exc}") from exc
        dbname = database or parsed.get("database") or "kestrel"
        try:
            client: Any = pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms,
                                         connectTimeoutMS=timeout_ms, tz_aware=False)
        except pymongo.errors.ConfigurationError as exc:  # e.g. an unresolvable mongodb+srv:// host
            raise StoreError(f"not a usable MongoDB URL {url!r}: {exc}") from exc
        self._setup(client, dbname, url)

    @classmethod
    def from_client(cls, client: Any, database: str = "kestrel") -> MongoStore:
        """A store on an already constructed client (anything with pymongo's MongoClient interface).

        The store owns the client from then on: close() closes it.
        """
        store = cls.__new__(cls)
        store._setup(client, database, "")
        return store

    def _setup(self, client: Any, dbname: str, url: str) -> None:
        import gridfs
        import pymongo
        from pymongo.write_concern import WriteConcern

        self.url = url
        self._pymongo = pymongo
        self.client: Any = client
        # Acknowledged only once a majority of the replica set has it in its journal: what the ingest
        # acknowledges to the broker survives a primary's crash or power loss (docs/hub.md).
        self.db = self.client.get_database(dbname, write_concern=WriteConcern(w=WRITE_CONCERN_W, j=True))
        self.frames = self.db["frames"]
        self.devices = self.db["devices"]
        self.models = self.db["models"]
        self.groups = self.db["groups"]
        self.fs = gridfs.GridFS(self.db, collection="images")
        self.blobs = GridBlobs(self.db, lambda fn: guarded(fn, "a bundle blob operation"))
        self._indexes()

    @_wrapped
    def _indexes(self) -> None:
        p = self._pymongo
        self.frames.create_index([("frame_id", p.ASCENDING)], unique=True)
        # frame_id is the tie-breaker of every frame sort: in the index so sort+skip+limit walk it
        # instead of sorting every matching document in memory
        self.frames.create_index([("device_id", p.ASCENDING), ("capture_time_ms", p.DESCENDING),
                                  ("frame_id", p.DESCENDING)])
        self.frames.create_index([("label", p.ASCENDING), ("capture_time_ms", p.DESCENDING),
                                  ("frame_id", p.DESCENDING)])
        self.frames.create_index([("capture_time_ms", p.DESCENDING), ("frame_id", p.DESCENDING)])
        self.devices.create_index([("device_id", p.ASCENDING)], unique=True)
        self.devices.create_index([("group", p.ASCENDING)])
        # device records of an older hub gain the reported threshold (0.0 = not reported yet); idempotent
        self.devices.update_many({"threshold": {"$exists": False}}, {"$set": {"threshold": 0.0}})
        self.models.create_index([("model_name", p.ASCENDING), ("version", p.DESCENDING)], unique=True)
        self.groups.create_index([("group", p.ASCENDING)], unique=True)
        self._web_setup()

    # ---- frames ----
    def _frame_doc(self, f: FrameRecord) -> Dict[str, Any]:
        doc = dataclasses.asdict(f)
        doc["image_sha256"] = f.image_sha256 or hashlib.sha256(f.image).hexdigest()
        doc["_id"] = f.frame_id
        doc["top_score"] = top_score(f.top_k)
        if len(f.image) > INLINE_IMAGE_MAX:
            # deterministic GridFS id: a retried insert reuses (or replaces) the same file
            file_id = f"img:{f.frame_id}"
            if not self.fs.exists(file_id):
                from gridfs.errors import FileExists
                try:
                    self.fs.put(f.image, _id=file_id, filename=f.frame_id)
                except FileExists:  # another worker stored the same frame's image meanwhile
                    pass
            doc["image"] = b""
            doc["image_gridfs_id"] = file_id
        else:
            doc["image"] = bytes(f.image)
        return doc

    @_wrapped
    def add_frame(self, frame: FrameRecord) -> bool:
        from pymongo.errors import DuplicateKeyError
        try:
            self.frames.insert_one(self._frame_doc(frame))
        except DuplicateKeyError:
            return False
        return True

    @_wrapped
    def apply_batch(self, frames: List[FrameRecord], devices: Dict[str, Dict[str, object]],
                    seen: Dict[str, int], points: Sequence[SeriesPoint] = ()) -> List[Optional[str]]:
        """Frames in one insert_many (large images to GridFS first), then the device upserts and
        last_seen raises in one ordered bulk_write. Not a transaction: every part is idempotent, so
        the retry after a failure anywhere redoes what is missing.

        Counts only (never data): after a write-concern error the frames that did reach the primary
        are found again by the retry and reported as already stored by their own device, so the
        ingest counts them as duplicates rather than stored."""
        for fields in devices.values():
            _check_device_fields(fields)
        out: List[Optional[str]] = [None] * len(frames)
        if frames:
            out = self._insert_frames(frames)
        ops = [self._pymongo.UpdateOne({"device_id": d}, self._device_update(d, fields), upsert=True)
               for d, fields in sorted(devices.items())]
        ops += [self._pymongo.UpdateOne({"device_id": d}, {"$max": {"last_seen_ms": int(ms)}})  # no upsert
                for d, ms in sorted(seen.items())]
        if ops:
            self.devices.bulk_write(ops, ordered=True)  # a device's upsert before its last_seen raise
        self._write_series(points)
        return out

    def _insert_frames(self, frames: List[FrameRecord]) -> List[Optional[str]]:
        from pymongo.errors import BulkWriteError
        docs = [self._frame_doc(f) for f in frames]
        try:
            self.frames.insert_many(docs, ordered=False)
            return [None] * len(frames)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                # written on the primary but not (yet) journaled on a majority: not durable, so not
                # "stored"; the retry finds the ones that made it as already stored
                raise StoreUnavailable("MongoDB could not confirm the write concern for a batch of frames: "
                                       f"{exc.details['writeConcernErrors'][0].get('errmsg')}") from exc
            dup_idx = {e["index"] for e in exc.details.get("writeErrors", []) if e.get("code") == 11000}
            other = [e for e in exc.details.get("writeErrors", []) if e.get("code") != 11000]
            if other:
                raise StoreError(f"MongoDB refused frames: {other[0].get('errmsg')}") from exc
        ids = sorted({frames[i].frame_id for i in dup_idx})
        owners = {d["frame_id"]: str(d.get("device_id", "")) for d in
                  self.frames.find({"frame_id": {"$in": ids}}, {"frame_id": 1, "device_id": 1})}
        out: List[Optional[str]] = []
        for i, f in enumerate(frames):
            if i not in dup_idx:
                out.append(None)
            elif f.frame_id in owners:
                out.append(owners[f.frame_id])
            else:  # pragma: no cover - a duplicate key whose document is gone (deleted meanwhile)
                raise StoreUnavailable(f"frame {f.frame_id!r} was a duplicate but is not found; retrying")
        return out

    def _to_frame(self, doc: Dict[str, Any], with_image: bool) -> FrameRecord:
        data: Dict[str, Any] = {k: doc.get(k) for k in FRAME_FIELDS if k in doc}
        image = doc.get("image") or b""
        if with_image and doc.get("image_gridfs_id"):
            image = self.fs.get(doc["image_gridfs_id"]).read()
        data["image"] = bytes(image) if with_image else b""
        data["labelled_by"] = data.get("labelled_by") or ""
        return FrameRecord(**data)

    @_wrapped
    def get_frame(self, frame_id: str) -> Optional[FrameRecord]:
        doc = self.frames.find_one({"frame_id": frame_id})
        return self._to_frame(doc, True) if doc else None

    @_wrapped
    def list_frames(self, device_id: Optional[str] = None, label: Optional[str] = None,
                    unlabelled: bool = False, since_ms: Optional[int] = None, limit: int = 100,
                    offset: int = 0, with_images: bool = False) -> List[FrameRecord]:
        q: Dict[str, Any] = {}
        if device_id is not None:
            q["device_id"] = device_id
        if label is not None and unlabelled:
            q["$and"] = [{"label": label}, {"label": None}]  # both asked: nothing matches (as in SQLite)
        elif label is not None:
            q["label"] = label
        elif unlabelled:
            q["label"] = None
        if since_ms is not None:
            q["capture_time_ms"] = {"$gte": int(since_ms)}
        proj = None if with_images else {"image": 0}
        cur = (self.frames.find(q, proj).sort([("capture_time_ms", -1), ("frame_id", -1)])
               .skip(int(offset)).limit(int(limit)))
        return [self._to_frame(d, with_images) for d in cur]

    @_wrapped
    def count_frames(self, device_id: Optional[str] = None) -> int:
        return int(self.frames.count_documents({} if device_id is None else {"device_id": device_id}))

    @_wrapped
    def set_labels(self, labels: Dict[str, Optional[str]], when_ms: int, by: str = "") -> Dict[str, Optional[str]]:
        return self._set_labels(labels, when_ms, by)

    @_wrapped
    def query_frames(self, query: FrameQuery) -> FramePage:
        return self._query_frames(query)

    @_wrapped
    def count_unlabelled(self) -> int:
        return int(self.frames.count_documents({"label": None}))

    def iter_labelled(self) -> Iterator[FrameRecord]:
        # keyset pagination: bounded memory, and no server cursor held open while the caller works
        # (an export slower than the cursor timeout would otherwise die with CursorNotFound)
        after: Optional[Dict[str, Any]] = None
        while True:
            page = self._labelled_page(after)
            if not page:
                return
            yield from page
            after = {"capture_time_ms": page[-1].capture_time_ms, "frame_id": page[-1].frame_id}

    @_wrapped
    def _labelled_page(self, after: Optional[Dict[str, Any]]) -> List[FrameRecord]:
        q: Dict[str, Any] = {"label": {"$ne": None}}
        if after is not None:
            t = after["capture_time_ms"]
            q["$or"] = [{"capture_time_ms": {"$gt": t}},
                        {"capture_time_ms": t, "frame_id": {"$gt": after["frame_id"]}}]
        cur = self.frames.find(q).sort([("capture_time_ms", 1), ("frame_id", 1)]).limit(ITER_PAGE)
        return [self._to_frame(d, True) for d in cur]

    # ---- devices ----
    @staticmethod
    def _device_update(device_id: str, fields: Dict[str, object]) -> Dict[str, Any]:
        defaults = {k: v for k, v in dataclasses.asdict(DeviceRecord(device_id=device_id)).items()
                    if k not in fields and k != "device_id"}
        update: Dict[str, Any] = {"$setOnInsert": defaults}
        if fields:  # MongoDB < 5.0 rejects an empty $set
            update["$set"] = dict(fields)
        return update

    @_wrapped
    def upsert_device(self, device_id: str, **fields: object) -> DeviceRecord:
        _check_device_fields(fields)
        doc = self.devices.find_one_and_update(
            {"device_id": device_id}, self._device_update(device_id, fields),
            upsert=True, return_document=self._pymongo.ReturnDocument.AFTER)
        if doc is None:  # pragma: no cover - upsert with AFTER always returns the document
            raise StoreError(f"upsert_device {device_id!r} returned nothing")
        return self._to_device(doc)

    @staticmethod
    def _to_device(doc: Dict[str, Any]) -> DeviceRecord:
        return DeviceRecord(**{k: v for k, v in doc.items() if k in DEVICE_FIELDS})

    @_wrapped
    def touch_devices(self, seen: Dict[str, int]) -> None:
        if seen:  # $max: never lowers it; no upsert; one round trip
            self.devices.bulk_write([self._pymongo.UpdateOne({"device_id": d}, {"$max": {"last_seen_ms": int(ms)}})
                                     for d, ms in sorted(seen.items())], ordered=False)

    @_wrapped
    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        doc = self.devices.find_one({"device_id": device_id})
        return self._to_device(doc) if doc else None

    @_wrapped
    def list_devices(self, group: Optional[str] = None) -> List[DeviceRecord]:
        q = {} if group is None else {"group": group}
        return [self._to_device(d) for d in self.devices.find(q).sort("device_id", 1)]

    # ---- groups ----
    @_wrapped
    def set_group_desired(self, group: str, model_name: str, version: int, rollback: bool,
                          issued_ms: int) -> GroupDesired:
        rec = GroupDesired(group, model_name, int(version), bool(rollback), int(issued_ms))
        self.groups.update_one({"group": group}, {"$set": dataclasses.asdict(rec)}, upsert=True)
        return rec

    @_wrapped
    def get_group_desired(self, group: str) -> Optional[GroupDesired]:
        doc = self.groups.find_one({"group": group})
        if doc is None:
            return None
        return GroupDesired(group=doc["group"], model_name=str(doc.get("model_name", "")),
                            version=int(doc.get("version", 0)), rollback=bool(doc.get("rollback", False)),
                            issued_ms=int(doc.get("issued_ms", 0)))

    # ---- models ----
    @_wrapped
    def add_model(self, model: ModelRecord) -> bool:
        from pymongo.errors import DuplicateKeyError
        try:
            self.models.insert_one(dataclasses.asdict(model))
        except DuplicateKeyError:
            return False
        return True

    @staticmethod
    def _to_model(doc: Dict[str, Any]) -> ModelRecord:
        names = {f.name for f in dataclasses.fields(ModelRecord)}
        return ModelRecord(**{k: v for k, v in doc.items() if k in names})

    @_wrapped
    def get_model(self, model_name: str, version: int) -> Optional[ModelRecord]:
        doc = self.models.find_one({"model_name": model_name, "version": int(version)})
        return self._to_model(doc) if doc else None

    @_wrapped
    def list_models(self, model_name: Optional[str] = None) -> List[ModelRecord]:
        q = {} if model_name is None else {"model_name": model_name}
        return [self._to_model(d) for d in self.models.find(q).sort([("version", -1), ("model_name", 1)])]

    # ---- telemetry series ----
    @_wrapped
    def add_series(self, points: Sequence[SeriesPoint]) -> None:
        self._write_series(points)

    @_wrapped
    def list_series(self, since_ms: int, until_ms: Optional[int] = None,
                    device_ids: Optional[List[str]] = None) -> List[SeriesPoint]:
        return self._list_series(since_ms, until_ms, device_ids)

    @_wrapped
    def prune_series(self, before_ms: int) -> int:
        return int(self.series.delete_many({"minute_ms": {"$lt": int(before_ms)}}).deleted_count)

    # ---- tokens and sessions ----
    @_wrapped
    def add_token(self, token: TokenRecord) -> bool:
        return self._add_token(token)

    @_wrapped
    def get_token(self, name: str) -> Optional[TokenRecord]:
        return self._token(self.tokens.find_one({"name": name}))

    @_wrapped
    def find_token(self, token_hash: str) -> Optional[TokenRecord]:
        return self._token(self.tokens.find_one({"token_hash": token_hash}))

    @_wrapped
    def list_tokens(self) -> List[TokenRecord]:
        return [t for t in (self._token(d) for d in self.tokens.find().sort("name", 1)) if t is not None]

    @_wrapped
    def revoke_token(self, name: str, when_ms: int) -> bool:
        res = self.tokens.update_one({"name": name, "revoked_ms": 0}, {"$set": {"revoked_ms": max(1, int(when_ms))}})
        return bool(res.matched_count == 1)

    @_wrapped
    def add_session(self, session: SessionRecord) -> None:
        self._add_session(session)

    @_wrapped
    def get_session(self, id_hash: str) -> Optional[SessionRecord]:
        return self._get_session(id_hash)

    @_wrapped
    def delete_session(self, id_hash: str) -> None:
        self.sessions.delete_one({"id_hash": id_hash})

    @_wrapped
    def prune_sessions(self, now_ms: int) -> int:
        return int(self.sessions.delete_many({"expires_ms": {"$lt": int(now_ms)}}).deleted_count)

    # ---- lifecycle ----
    @_wrapped
    def ping(self) -> None:
        self.client.admin.command("ping")

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"MongoStore(db={self.db.name!r})"
