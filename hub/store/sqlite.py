"""SQLite backend: the embedded default. One file, WAL mode; images in append-only segment files next
to it (hub/store/segments.py, docs/adr/0009-sqlite-images-in-segment-files.md), written and fsynced
before the rows that point at them are committed; an older hub's BLOB images still read. The registry's
bundles are files in ``<db>-bundles/`` (hub/store/blobs.py).

Thread-safe by giving every thread its own connection; several processes may share the file (WAL +
busy_timeout), which is how two hub workers on one machine split the ingest. Locked/unreachable
database errors become StoreUnavailable (the ingest retries), everything else StoreError. The
connections and the write transaction are hub/store/sqlite_conn.py, the schema
hub/store/sqlite_schema.py, the background checkpoints hub/store/sqlite_checkpoint.py.

Durability and speed (docs/hub.md, docs/adr/0005-hub-ingest-durability.md):

* ``synchronous`` is FULL by default: every commit fsyncs the WAL, so what the ingest acknowledged
  survives a power loss or an OS crash. NORMAL (opt-in) fsyncs only at checkpoints: a power loss
  can take back the commits since the last checkpoint (at most ``checkpoint_interval_s``).
* New databases use 4 KiB pages: rows are small (the images are in segment files).
* Checkpoints run on a background thread of their own (``wal_autocheckpoint`` is off on the
  store's connections), never inside a commit: a commit does not stall while the WAL is copied
  into the database. A PASSIVE checkpoint never waits for anyone, but under continuous writes it
  never quite catches up, and SQLite only restarts the WAL from its beginning once everything was
  copied. So once the WAL is past ``WAL_RESET_BYTES`` the checkpointer copies the bulk without any
  lock, then holds this process's writers (an in-process lock, not SQLite's) for a second PASSIVE
  pass over the few pages written meanwhile; the next commit then restarts the WAL. Readers are
  never waited for (a RESTART checkpoint would, stalling the ingest behind a dashboard query).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, TypeVar, Union

from hub.errors import StoreError, StoreUnavailable
from hub.store.base import DeviceRecord, FrameRecord, GroupDesired, ModelRecord, Store
from hub.store.blobs import BlobMethods, FileBlobs
from hub.store.query import top_score
from hub.store.segments import ImageRef, Segments
from hub.store.series import SeriesPoint
from hub.store.sqlite_checkpoint import CHECKPOINT_INTERVAL_S, Checkpointer
from hub.store.sqlite_conn import SYNCHRONOUS_MODES as SYNCHRONOUS_MODES  # hub.config reads it from here
from hub.store.sqlite_conn import Connections
from hub.store.sqlite_schema import FRAME_COLUMNS, SEGMENT_COLUMNS, create_schema
from hub.store.sqlite_web import SqliteWebMixin

T = TypeVar("T")

log = logging.getLogger("hub.store.sqlite")

STAGED_MAX = 4096                   # images written ahead by stage_frames and not yet committed, at most
SEGMENT_DIR_SUFFIX = "-images"  # <db file name>-images/, next to the database (like its -wal file)
BLOB_DIR_SUFFIX = "-bundles"    # <db file name>-bundles/: the registry's bundles (hub/store/blobs.py)
DEVICE_FIELDS = {f.name for f in dataclasses.fields(DeviceRecord)}


def _device(doc: Dict[str, Any]) -> DeviceRecord:
    """A device doc as a record; fields this hub does not know (a newer hub wrote them) are left out."""
    return DeviceRecord(**{k: v for k, v in doc.items() if k in DEVICE_FIELDS})


def _check_device_fields(fields: Dict[str, object]) -> None:
    unknown = sorted(set(fields) - DEVICE_FIELDS)
    if unknown or "device_id" in fields:
        raise StoreError(f"upsert_device: unknown or immutable field(s) {unknown or ['device_id']}")


def path_from_url(url: str) -> Path:
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    if url.startswith("sqlite://"):
        return Path(url[len("sqlite://"):])
    return Path(url)


class SqliteStore(SqliteWebMixin, BlobMethods, Store):
    def __init__(self, path: Union[str, Path], busy_timeout_ms: int = 10000, synchronous: str = "FULL",
                 checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        self.path = Path(path).expanduser().resolve()
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous.upper()
        if self.synchronous not in SYNCHRONOUS_MODES:
            raise StoreError(f"SQLite synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, "
                             f"not {synchronous!r}")
        # 0 = SQLite's own auto-checkpoint inside commits (no background thread)
        self.checkpoint_interval_s = checkpoint_interval_s
        self._db = Connections(self.path, busy_timeout_ms, self.synchronous, own_checkpoints=checkpoint_interval_s > 0)
        self._wal = Checkpointer(self._db, checkpoint_interval_s)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the directory for {self.path}: {exc.strerror}") from exc
        self.segments = Segments(self.path.parent / f"{self.path.name}{SEGMENT_DIR_SUFFIX}")
        self.blobs = FileBlobs(self.path.parent / f"{self.path.name}{BLOB_DIR_SUFFIX}")
        self._staged: Dict[str, ImageRef] = {}  # frame_id -> its image, written ahead (no image kept in memory)
        self._staged_lock = threading.Lock()
        self._run("create schema", create_schema)

    # ---- plumbing (hub/store/sqlite_conn.py, hub/store/sqlite_checkpoint.py) ----
    def _conn(self) -> sqlite3.Connection:
        return self._db.conn()

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._db.run(what, fn)

    def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._wal.start()
        return self._db.write(what, fn)

    @property
    def checkpoints(self) -> int:
        return self._wal.checkpoints

    @property
    def checkpoint_catchups(self) -> int:
        return self._wal.catchups

    def checkpoint_once(self, conn: Optional[sqlite3.Connection] = None) -> Tuple[int, int]:
        """One checkpoint step: (WAL frames, frames checkpointed). Public for tests and tools."""
        return self._wal.checkpoint_once(conn or self._conn())

    # ---- frames ----
    @staticmethod
    def _frame_row(f: FrameRecord, ref: Optional[ImageRef]) -> Tuple[Any, ...]:
        where: Tuple[Any, ...] = (ref.segment, ref.offset, ref.length) if ref else (None,) * 3
        sha = ref.sha256 if ref else (f.image_sha256 or hashlib.sha256(f.image).hexdigest())
        return (f.frame_id, f.device_id, int(f.capture_time_ms), int(f.received_ms), f.model_name,
                int(f.model_version), f.model_sha256, json.dumps(list(f.reasons)), json.dumps(list(f.top_k)),
                sqlite3.Binary(b"" if ref else f.image), f.image_format, int(f.width), int(f.height), f.source,
                int(f.sequence), f.label, f.labelled_ms, sha, f.labelled_by) + where + (top_score(f.top_k),)

    _INSERT = (f"INSERT OR IGNORE INTO frames ({', '.join(FRAME_COLUMNS + SEGMENT_COLUMNS + ['top_score'])}) "
               f"VALUES ({', '.join('?' * len(FRAME_COLUMNS + SEGMENT_COLUMNS + ['top_score']))})")

    def _existing(self, frame_ids: List[str]) -> Set[str]:
        """Which of these frame ids are stored already (their images need not be written again)."""
        def q(c: sqlite3.Connection) -> Set[str]:
            found: Set[str] = set()
            for i in range(0, len(frame_ids), 500):
                part = frame_ids[i:i + 500]
                sql = f"SELECT frame_id FROM frames WHERE frame_id IN ({', '.join('?' * len(part))})"
                found.update(r[0] for r in c.execute(sql, part).fetchall())
            return found
        return self._run("apply_batch", q)

    def add_frame(self, frame: FrameRecord) -> bool:
        return self.add_frames([frame])[0] is None

    def apply_batch(self, frames: List[FrameRecord], devices: Dict[str, Dict[str, object]],
                    seen: Dict[str, int], points: Sequence[SeriesPoint] = ()) -> List[Optional[str]]:
        """One transaction (one fsync with FULL): device upserts, frames, last_seen raises, series points."""
        if not frames and not devices and not seen and not points:
            return []
        for fields in devices.values():
            _check_device_fields(fields)
        # images first (unless stage_frames wrote them already), each new one once, in one write and one
        # fdatasync: a committed row never points at bytes that are not on disk
        refs = self._images_for(frames)
        rows = [self._frame_row(f, refs.get(id(f))) for f in frames]

        def tx(c: sqlite3.Connection) -> List[Optional[str]]:
            for device_id, fields in sorted(devices.items()):
                self._upsert(c, device_id, fields)
            out: List[Optional[str]] = []
            for f, row in zip(frames, rows):
                if c.execute(self._INSERT, row).rowcount == 1:
                    out.append(None)
                    continue
                owner = c.execute("SELECT device_id FROM frames WHERE frame_id = ?", (f.frame_id,)).fetchone()
                if owner is None:  # OR IGNORE also skips rows breaking NOT NULL/CHECK: not a duplicate
                    raise StoreError(f"SQLite refused frame {f.frame_id!r} (a constraint other than its id)")
                out.append(str(owner[0]))
            self._touch(c, seen)
            self._add_series_tx(c, points)
            return out
        out = self._write("apply_batch", tx)
        if refs:
            with self._staged_lock:
                for f in frames:
                    self._staged.pop(f.frame_id, None)
        return out

    def stage_frames(self, frames: List[FrameRecord]) -> None:
        """Write the images of frames that a later apply_batch will add (segment files, one write and one
        fdatasync), so that commit only writes rows: the ingest calls this on its validate thread while
        the commit thread commits the batch before. Frames already stored are skipped."""
        refs = self._write_images([f for f in frames if f.image], trust_hashes=True)
        with self._staged_lock:
            for f in frames:
                if id(f) in refs:
                    self._staged[f.frame_id] = refs[id(f)]
            while len(self._staged) > STAGED_MAX:  # never applied (refused, a stopped ingest): forget the oldest
                self._staged.pop(next(iter(self._staged)))

    def _write_images(self, frames: List[FrameRecord], trust_hashes: bool = False) -> Dict[int, ImageRef]:
        """id(frame) -> where its image is now, for those frames whose id is not stored yet. The frames'
        image_sha256 is used only when ``trust_hashes`` (stage_frames: the ingest hashed the very bytes on
        its validate pool); else the hash is computed here, so a wrong one can never make an image unreadable."""
        known = self._existing([f.frame_id for f in frames]) if frames else set()
        new = [f for f in frames if f.frame_id not in known and f.image]
        if not new:
            return {}
        hashes = [f.image_sha256 for f in new] if trust_hashes else None
        return dict(zip((id(f) for f in new), self.segments.append([f.image for f in new], hashes)))

    def _images_for(self, frames: List[FrameRecord]) -> Dict[int, ImageRef]:
        refs: Dict[int, ImageRef] = {}
        missing: List[FrameRecord] = []
        with self._staged_lock:
            for f in frames:
                got = self._staged.get(f.frame_id)
                # the very bytes written ahead: same length and hash (else they are an orphan)
                if got is not None and got.length == len(f.image) and \
                        got.sha256 == (f.image_sha256 or hashlib.sha256(f.image).hexdigest()):
                    refs[id(f)] = got
                elif f.image:
                    missing.append(f)
        refs.update(self._write_images(missing))
        return refs

    def _to_frame(self, d: Dict[str, Any]) -> FrameRecord:
        d["reasons"] = json.loads(d["reasons"])
        d["top_k"] = json.loads(d["top_k"])
        where = [d.pop(c, None) for c in SEGMENT_COLUMNS]
        d["image_sha256"] = d.get("image_sha256") or ""
        d["labelled_by"] = d.get("labelled_by") or ""
        if where[0] is not None:  # in a segment file; else (an older hub's row) the BLOB itself
            d["image"] = self.segments.read(d["frame_id"], ImageRef(str(where[0]), int(where[1]), int(where[2]),
                                                                     d["image_sha256"]))
        else:
            d["image"] = bytes(d["image"]) if d["image"] is not None else b""
        return FrameRecord(**d)

    def _select(self, where: str, params: List[Any], order: str, limit: Optional[int], offset: int,
                with_images: bool) -> List[FrameRecord]:
        cols = ", ".join(c if c != "image" or with_images else "x'' AS image" for c in FRAME_COLUMNS)
        if with_images:
            cols += ", " + ", ".join(SEGMENT_COLUMNS)
        sql = f"SELECT {cols} FROM frames {where} ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params = params + [int(limit), int(offset)]

        def q(c: sqlite3.Connection) -> List[Dict[str, Any]]:
            cur = c.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
        # images are read (and checked) after the query, outside SQLite's error translation
        return [self._to_frame(d) for d in self._run("list_frames", q)]

    def get_frame(self, frame_id: str) -> Optional[FrameRecord]:
        got = self._select("WHERE frame_id = ?", [frame_id], "frame_id", None, 0, True)
        return got[0] if got else None

    def list_frames(self, device_id: Optional[str] = None, label: Optional[str] = None,
                    unlabelled: bool = False, since_ms: Optional[int] = None, limit: int = 100,
                    offset: int = 0, with_images: bool = False) -> List[FrameRecord]:
        conds: List[str] = []
        params: List[Any] = []
        if device_id is not None:
            conds.append("device_id = ?")
            params.append(device_id)
        if label is not None:
            conds.append("label = ?")
            params.append(label)
        if unlabelled:
            conds.append("label IS NULL")
        if since_ms is not None:
            conds.append("capture_time_ms >= ?")
            params.append(int(since_ms))
        where = ("WHERE " + " AND ".join(conds)) if conds else ""
        return self._select(where, params, "capture_time_ms DESC, frame_id DESC", limit, offset, with_images)

    def count_frames(self, device_id: Optional[str] = None) -> int:
        if device_id is None:
            return int(self._run("count_frames",
                                 lambda c: c.execute("SELECT COUNT(*) FROM frames").fetchone()[0]))
        return int(self._run("count_frames", lambda c: c.execute(
            "SELECT COUNT(*) FROM frames WHERE device_id = ?", (device_id,)).fetchone()[0]))

    def iter_labelled(self) -> Iterator[FrameRecord]:
        last: Tuple[int, str] = (-(2 ** 62), "")
        while True:  # keyset pagination: bounded memory, no long-lived cursor across yields
            page = self._select("WHERE label IS NOT NULL AND (capture_time_ms > ? OR "
                                "(capture_time_ms = ? AND frame_id > ?))",
                                [last[0], last[0], last[1]], "capture_time_ms ASC, frame_id ASC",
                                100, 0, True)
            if not page:
                return
            yield from page
            last = (page[-1].capture_time_ms, page[-1].frame_id)

    # ---- devices ----
    @staticmethod
    def _upsert(c: sqlite3.Connection, device_id: str, fields: Dict[str, object]) -> DeviceRecord:
        row = c.execute("SELECT doc FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        doc: Dict[str, Any] = json.loads(row[0]) if row else {}
        doc.update(fields)
        doc["device_id"] = device_id
        rec = _device(doc)
        c.execute("INSERT OR REPLACE INTO devices (device_id, doc, grp) VALUES (?, ?, ?)",
                  (device_id, json.dumps(dataclasses.asdict(rec)), rec.group))
        return rec

    @staticmethod
    def _touch(c: sqlite3.Connection, seen: Dict[str, int]) -> None:
        for device_id, ms in sorted(seen.items()):
            row = c.execute("SELECT doc FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            if row is None:
                continue
            doc = json.loads(row[0])
            if int(ms) > int(doc.get("last_seen_ms") or 0):
                doc["last_seen_ms"] = int(ms)
                c.execute("UPDATE devices SET doc = ? WHERE device_id = ?", (json.dumps(doc), device_id))

    def upsert_device(self, device_id: str, **fields: object) -> DeviceRecord:
        _check_device_fields(fields)
        return self._write("upsert_device", lambda c: self._upsert(c, device_id, fields))

    def touch_devices(self, seen: Dict[str, int]) -> None:
        if seen:
            self._write("touch_devices", lambda c: self._touch(c, seen))

    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        row = self._run("get_device", lambda c: c.execute(
            "SELECT doc FROM devices WHERE device_id = ?", (device_id,)).fetchone())
        return _device(json.loads(row[0])) if row else None

    def list_devices(self, group: Optional[str] = None) -> List[DeviceRecord]:
        if group is None:
            rows = self._run("list_devices", lambda c: c.execute(
                "SELECT doc FROM devices ORDER BY device_id").fetchall())
        else:
            rows = self._run("list_devices", lambda c: c.execute(
                "SELECT doc FROM devices WHERE grp = ? ORDER BY device_id", (group,)).fetchall())
        return [_device(json.loads(r[0])) for r in rows]

    # ---- groups ----
    def set_group_desired(self, group: str, model_name: str, version: int, rollback: bool,
                          issued_ms: int) -> GroupDesired:
        rec = GroupDesired(group, model_name, int(version), bool(rollback), int(issued_ms))
        self._write("set_group_desired", lambda c: c.execute(
            "INSERT OR REPLACE INTO groups (grp, model_name, version, rollback, issued_ms) VALUES (?, ?, ?, ?, ?)",
            (rec.group, rec.model_name, rec.version, int(rec.rollback), rec.issued_ms)))
        return rec

    def get_group_desired(self, group: str) -> Optional[GroupDesired]:
        row = self._run("get_group_desired", lambda c: c.execute(
            "SELECT grp, model_name, version, rollback, issued_ms FROM groups WHERE grp = ?", (group,)).fetchone())
        if row is None:
            return None
        return GroupDesired(group=row[0], model_name=row[1], version=int(row[2]), rollback=bool(row[3]),
                            issued_ms=int(row[4]))

    # ---- models ----
    def add_model(self, model: ModelRecord) -> bool:
        return bool(self._write("add_model", lambda c: c.execute(
            "INSERT OR IGNORE INTO models (model_name, version, doc) VALUES (?, ?, ?)",
            (model.model_name, int(model.version), json.dumps(dataclasses.asdict(model)))).rowcount == 1))

    def get_model(self, model_name: str, version: int) -> Optional[ModelRecord]:
        row = self._run("get_model", lambda c: c.execute(
            "SELECT doc FROM models WHERE model_name = ? AND version = ?",
            (model_name, int(version))).fetchone())
        return ModelRecord(**json.loads(row[0])) if row else None

    def list_models(self, model_name: Optional[str] = None) -> List[ModelRecord]:
        if model_name is None:
            rows = self._run("list_models", lambda c: c.execute(
                "SELECT doc FROM models ORDER BY version DESC, model_name").fetchall())
        else:
            rows = self._run("list_models", lambda c: c.execute(
                "SELECT doc FROM models WHERE model_name = ? ORDER BY version DESC",
                (model_name,)).fetchall())
        return [ModelRecord(**json.loads(r[0])) for r in rows]

    # ---- lifecycle ----
    def health(self) -> Dict[str, object]:
        return {"checkpoints": self.checkpoints, "checkpoint_catchups": self.checkpoint_catchups,
                "image_writes": self.segments.appends}

    def ping(self) -> None:
        self._run("ping", lambda c: c.execute("SELECT 1 FROM frames LIMIT 1").fetchall())

    def close(self) -> None:
        self._db.closed = True
        self.segments.close()
        self._wal.stop()
        self._db.close()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"
