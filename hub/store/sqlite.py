"""SQLite backend: the embedded default. One file, WAL mode, images as BLOBs.

Thread-safe by giving every thread its own connection; several processes may share the file (WAL +
busy_timeout), which is how two hub workers on one machine split the ingest. Locked/unreachable
database errors become StoreUnavailable (the ingest retries), everything else StoreError.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar, Union

from hub.errors import StoreError, StoreUnavailable
from hub.store.base import DeviceRecord, FrameRecord, GroupDesired, ModelRecord, Store

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
  frame_id TEXT PRIMARY KEY,
  device_id TEXT NOT NULL,
  capture_time_ms INTEGER NOT NULL,
  received_ms INTEGER NOT NULL,
  model_name TEXT NOT NULL,
  model_version INTEGER NOT NULL,
  model_sha256 TEXT NOT NULL,
  reasons TEXT NOT NULL,
  top_k TEXT NOT NULL,
  image BLOB NOT NULL,
  image_format TEXT NOT NULL,
  width INTEGER NOT NULL,
  height INTEGER NOT NULL,
  source TEXT NOT NULL DEFAULT '',
  sequence INTEGER NOT NULL DEFAULT 0,
  label TEXT,
  labelled_ms INTEGER
);
CREATE INDEX IF NOT EXISTS frames_time ON frames (capture_time_ms DESC);
CREATE INDEX IF NOT EXISTS frames_device_time ON frames (device_id, capture_time_ms DESC);
CREATE INDEX IF NOT EXISTS frames_label_time ON frames (label, capture_time_ms DESC) WHERE label IS NOT NULL;
CREATE INDEX IF NOT EXISTS frames_unlabelled_time ON frames (capture_time_ms DESC) WHERE label IS NULL;
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY,
  doc TEXT NOT NULL,
  grp TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_group ON devices (grp);
CREATE TABLE IF NOT EXISTS groups (
  grp TEXT PRIMARY KEY,
  model_name TEXT NOT NULL,
  version INTEGER NOT NULL,
  rollback INTEGER NOT NULL,
  issued_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
  model_name TEXT NOT NULL,
  version INTEGER NOT NULL,
  doc TEXT NOT NULL,
  PRIMARY KEY (model_name, version)
);
"""

FRAME_COLUMNS = [f.name for f in dataclasses.fields(FrameRecord)]
DEVICE_FIELDS = {f.name for f in dataclasses.fields(DeviceRecord)}
_UNAVAILABLE_HINTS = ("locked", "busy", "unable to open", "disk i/o", "readonly", "read-only",
                      "no such table", "disk is full")


def _wrap(exc: sqlite3.Error, what: str) -> Exception:
    msg = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and any(h in msg for h in _UNAVAILABLE_HINTS):
        return StoreUnavailable(f"SQLite store unavailable during {what}: {exc}")
    return StoreError(f"SQLite store error during {what}: {exc}")


def path_from_url(url: str) -> Path:
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    if url.startswith("sqlite://"):
        return Path(url[len("sqlite://"):])
    return Path(url)


class SqliteStore(Store):
    def __init__(self, path: Union[str, Path], busy_timeout_ms: int = 10000) -> None:
        self.path = Path(path).expanduser().resolve()
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._conns: List[Tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the directory for {self.path}: {exc.strerror}") from exc
        self._run("create schema", lambda c: c.executescript(SCHEMA))

    # ---- plumbing ----
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("the SQLite store is closed")
        conn: Optional[sqlite3.Connection] = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_ms / 1000.0,
                                       isolation_level=None, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as exc:
                raise _wrap(exc, f"open {self.path}") from exc
            self._local.conn = conn
            with self._conns_lock:
                # close the connections of threads that ended (HTTP servers use a thread per request)
                alive = []
                for thread, other in self._conns:
                    if thread.is_alive():
                        alive.append((thread, other))
                    else:
                        other.close()
                self._conns = alive + [(threading.current_thread(), conn)]
        return conn

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn())
        except sqlite3.Error as exc:
            raise _wrap(exc, what) from exc

    def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        def tx(c: sqlite3.Connection) -> T:
            c.execute("BEGIN IMMEDIATE")
            try:
                out = fn(c)
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
            return out
        return self._run(what, tx)

    # ---- frames ----
    @staticmethod
    def _frame_row(f: FrameRecord) -> Tuple[Any, ...]:
        return (f.frame_id, f.device_id, int(f.capture_time_ms), int(f.received_ms), f.model_name,
                int(f.model_version), f.model_sha256, json.dumps(list(f.reasons)), json.dumps(list(f.top_k)),
                sqlite3.Binary(f.image), f.image_format, int(f.width), int(f.height), f.source,
                int(f.sequence), f.label, f.labelled_ms)

    _INSERT = (f"INSERT OR IGNORE INTO frames ({', '.join(FRAME_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(FRAME_COLUMNS))})")

    def add_frame(self, frame: FrameRecord) -> bool:
        return self.add_frames([frame])[0]

    def add_frames(self, frames: List[FrameRecord]) -> List[bool]:
        if not frames:
            return []
        rows = [self._frame_row(f) for f in frames]

        def ins(c: sqlite3.Connection) -> List[bool]:
            return [c.execute(self._INSERT, row).rowcount == 1 for row in rows]
        return self._write("add_frames", ins)

    @staticmethod
    def _to_frame(d: Dict[str, Any]) -> FrameRecord:
        d["reasons"] = json.loads(d["reasons"])
        d["top_k"] = json.loads(d["top_k"])
        d["image"] = bytes(d["image"]) if d["image"] is not None else b""
        return FrameRecord(**d)

    def _select(self, where: str, params: List[Any], order: str, limit: Optional[int], offset: int,
                with_images: bool) -> List[FrameRecord]:
        cols = ", ".join(c if c != "image" or with_images else "x'' AS image" for c in FRAME_COLUMNS)
        sql = f"SELECT {cols} FROM frames {where} ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params = params + [int(limit), int(offset)]

        def q(c: sqlite3.Connection) -> List[FrameRecord]:
            cur = c.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [self._to_frame(dict(zip(names, r))) for r in cur.fetchall()]
        return self._run("list_frames", q)

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

    def set_label(self, frame_id: str, label: Optional[str], when_ms: int) -> bool:
        return bool(self._write("set_label", lambda c: c.execute(
            "UPDATE frames SET label = ?, labelled_ms = ? WHERE frame_id = ?",
            (label, None if label is None else int(when_ms), frame_id)).rowcount == 1))

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
    def upsert_device(self, device_id: str, **fields: object) -> DeviceRecord:
        unknown = sorted(set(fields) - DEVICE_FIELDS)
        if unknown or "device_id" in fields:
            raise StoreError(f"upsert_device: unknown or immutable field(s) {unknown or ['device_id']}")

        def up(c: sqlite3.Connection) -> DeviceRecord:
            row = c.execute("SELECT doc FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            doc: Dict[str, Any] = json.loads(row[0]) if row else {}
            doc.update(fields)
            doc["device_id"] = device_id
            rec = DeviceRecord(**doc)
            c.execute("INSERT OR REPLACE INTO devices (device_id, doc, grp) VALUES (?, ?, ?)",
                      (device_id, json.dumps(dataclasses.asdict(rec)), rec.group))
            return rec
        return self._write("upsert_device", up)

    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        row = self._run("get_device", lambda c: c.execute(
            "SELECT doc FROM devices WHERE device_id = ?", (device_id,)).fetchone())
        return DeviceRecord(**json.loads(row[0])) if row else None

    def list_devices(self, group: Optional[str] = None) -> List[DeviceRecord]:
        if group is None:
            rows = self._run("list_devices", lambda c: c.execute(
                "SELECT doc FROM devices ORDER BY device_id").fetchall())
        else:
            rows = self._run("list_devices", lambda c: c.execute(
                "SELECT doc FROM devices WHERE grp = ? ORDER BY device_id", (group,)).fetchall())
        return [DeviceRecord(**json.loads(r[0])) for r in rows]

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
    def ping(self) -> None:
        self._run("ping", lambda c: c.execute("SELECT 1 FROM frames LIMIT 1").fetchall())

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for _, c in conns:
            try:
                c.close()
            except sqlite3.Error:  # pragma: no cover
                pass

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"
