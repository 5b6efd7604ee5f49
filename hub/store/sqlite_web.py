"""The SQLite store's dashboard half: labels with who and when, the keyset frame query, the telemetry
series, API tokens and sessions (the contract is hub/store/base.py; the tables and the indexes the
label queue's orders read are in hub/store/sqlite_schema.py).
"""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from hub.store.authrecords import SessionRecord, TokenRecord
from hub.store.query import UNUSABLE_LABEL, FramePage, FrameQuery, page_of
from hub.store.series import SeriesPoint

if TYPE_CHECKING:  # pragma: no cover
    from hub.store.base import FrameRecord

T = TypeVar("T")


def _where(q: FrameQuery) -> Tuple[List[str], List[Any]]:
    conds: List[str] = []
    params: List[Any] = []
    if q.device_ids is not None:
        conds.append(f"device_id IN ({', '.join('?' * len(q.device_ids))})" if q.device_ids else "0")
        params.extend(q.device_ids)
    for col, value in (("model_name", q.model_name), ("model_version", q.model_version), ("label", q.label)):
        if value is not None:
            conds.append(f"{col} = ?")
            params.append(value)
    if q.reason is not None:  # validated: one of the REASONS names, no LIKE wildcards
        conds.append("reasons LIKE ?")
        params.append(f'%"{q.reason}"%')
    if q.min_score is not None:
        conds.append("top_score >= ?")
        params.append(float(q.min_score))
    if q.max_score is not None:
        conds.append("top_score < ?")
        params.append(float(q.max_score))
    if q.label_state == "unlabelled":
        conds.append("label IS NULL")
    elif q.label_state == "labelled":
        conds.append("label IS NOT NULL AND label != ?")
        params.append(UNUSABLE_LABEL)
    elif q.label_state == "unusable":
        conds.append("label = ?")
        params.append(UNUSABLE_LABEL)
    if q.since_ms is not None:
        conds.append("capture_time_ms >= ?")
        params.append(int(q.since_ms))
    if q.until_ms is not None:
        conds.append("capture_time_ms < ?")
        params.append(int(q.until_ms))
    after = q.cursor()
    if after is not None:
        if q.order == "newest":
            conds.append("(capture_time_ms < ? OR (capture_time_ms = ? AND frame_id < ?))")
        else:
            conds.append("(top_score > ? OR (top_score = ? AND frame_id > ?))")
        params.extend([after[0], after[0], after[1]])
    return conds, params


class SqliteWebMixin:
    """Mixed into SqliteStore: uses its connection plumbing (_run, _write, _select)."""

    if TYPE_CHECKING:  # pragma: no cover - provided by SqliteStore
        def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T: ...
        def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T: ...
        def _select(self, where: str, params: List[Any], order: str, limit: Optional[int], offset: int,
                    with_images: bool) -> List[FrameRecord]: ...

    # ---- labels ----
    def set_labels(self, labels: Dict[str, Optional[str]], when_ms: int, by: str = "") -> Dict[str, Optional[str]]:
        def tx(c: sqlite3.Connection) -> Dict[str, Optional[str]]:
            before: Dict[str, Optional[str]] = {}
            for frame_id, label in labels.items():
                row = c.execute("SELECT label FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
                if row is None:
                    continue
                before[frame_id] = row[0]
                c.execute("UPDATE frames SET label = ?, labelled_ms = ?, labelled_by = ? WHERE frame_id = ?",
                          (label, None if label is None else int(when_ms), None if label is None else by,
                           frame_id))
            return before
        return self._write("set_labels", tx) if labels else {}

    # ---- the frame query ----
    def query_frames(self, query: FrameQuery) -> FramePage:
        q = query.validate()
        conds, params = _where(q)
        order = "capture_time_ms DESC, frame_id DESC" if q.order == "newest" else "top_score ASC, frame_id ASC"
        where = ("WHERE " + " AND ".join(conds)) if conds else ""
        return page_of(q, self._select(where, params, order, q.limit + 1, 0, False))

    def count_unlabelled(self) -> int:
        return int(self._run("count_unlabelled", lambda c: c.execute(
            "SELECT COUNT(*) FROM frames WHERE label IS NULL").fetchone()[0]))

    # ---- telemetry series ----
    _SERIES_UPSERT = ("INSERT INTO telemetry_series (device_id, minute_ms, time_ms, doc) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (device_id, minute_ms) DO UPDATE SET time_ms = excluded.time_ms, "
                      "doc = excluded.doc WHERE excluded.time_ms >= telemetry_series.time_ms")

    @classmethod
    def _add_series_tx(cls, c: sqlite3.Connection, points: Sequence[SeriesPoint]) -> None:
        if points:
            c.executemany(cls._SERIES_UPSERT, [(p.device_id, int(p.minute_ms), int(p.time_ms),
                                                 json.dumps(p.to_doc())) for p in points])

    def add_series(self, points: Sequence[SeriesPoint]) -> None:
        if points:
            self._write("add_series", lambda c: self._add_series_tx(c, points))

    def list_series(self, since_ms: int, until_ms: Optional[int] = None,
                    device_ids: Optional[List[str]] = None) -> List[SeriesPoint]:
        sql = "SELECT doc FROM telemetry_series WHERE minute_ms >= ?"
        params: List[Any] = [int(since_ms)]
        if until_ms is not None:
            sql += " AND minute_ms < ?"
            params.append(int(until_ms))
        if device_ids is not None:
            if not device_ids:
                return []
            sql += f" AND device_id IN ({', '.join('?' * len(device_ids))})"
            params.extend(device_ids)
        rows = self._run("list_series", lambda c: c.execute(sql + " ORDER BY device_id, minute_ms",
                                                            params).fetchall())
        return [SeriesPoint.from_doc(json.loads(r[0])) for r in rows]

    def prune_series(self, before_ms: int) -> int:
        return int(self._write("prune_series", lambda c: c.execute(
            "DELETE FROM telemetry_series WHERE minute_ms < ?", (int(before_ms),)).rowcount))

    # ---- tokens ----
    _TOKEN_COLS = "name, role, token_hash, created_ms, revoked_ms"

    @staticmethod
    def _token(row: Optional[Tuple[Any, ...]]) -> Optional[TokenRecord]:
        return TokenRecord(str(row[0]), str(row[1]), str(row[2]), int(row[3]), int(row[4])) if row else None

    def add_token(self, token: TokenRecord) -> bool:
        def tx(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT revoked_ms FROM tokens WHERE name = ?", (token.name,)).fetchone()
            if row is not None and int(row[0]) == 0:
                return False
            c.execute(f"INSERT OR REPLACE INTO tokens ({self._TOKEN_COLS}) VALUES (?, ?, ?, ?, ?)",
                      (token.name, token.role, token.token_hash, int(token.created_ms), int(token.revoked_ms)))
            return True
        return bool(self._write("add_token", tx))

    def get_token(self, name: str) -> Optional[TokenRecord]:
        return self._token(self._run("get_token", lambda c: c.execute(
            f"SELECT {self._TOKEN_COLS} FROM tokens WHERE name = ?", (name,)).fetchone()))

    def find_token(self, token_hash: str) -> Optional[TokenRecord]:
        return self._token(self._run("find_token", lambda c: c.execute(
            f"SELECT {self._TOKEN_COLS} FROM tokens WHERE token_hash = ?", (token_hash,)).fetchone()))

    def list_tokens(self) -> List[TokenRecord]:
        rows = self._run("list_tokens", lambda c: c.execute(
            f"SELECT {self._TOKEN_COLS} FROM tokens ORDER BY name").fetchall())
        return [t for t in (self._token(r) for r in rows) if t is not None]

    def revoke_token(self, name: str, when_ms: int) -> bool:
        return bool(self._write("revoke_token", lambda c: c.execute(
            "UPDATE tokens SET revoked_ms = ? WHERE name = ? AND revoked_ms = 0",
            (max(1, int(when_ms)), name)).rowcount == 1))

    # ---- sessions ----
    def add_session(self, session: SessionRecord) -> None:
        self._write("add_session", lambda c: c.execute(
            "INSERT OR REPLACE INTO sessions (id_hash, token_name, csrf, created_ms, expires_ms) "
            "VALUES (?, ?, ?, ?, ?)", (session.id_hash, session.token_name, session.csrf, int(session.created_ms),
                                       int(session.expires_ms))))

    def get_session(self, id_hash: str) -> Optional[SessionRecord]:
        row = self._run("get_session", lambda c: c.execute(
            "SELECT id_hash, token_name, csrf, created_ms, expires_ms FROM sessions WHERE id_hash = ?",
            (id_hash,)).fetchone())
        return SessionRecord(str(row[0]), str(row[1]), str(row[2]), int(row[3]), int(row[4])) if row else None

    def delete_session(self, id_hash: str) -> None:
        self._write("delete_session", lambda c: c.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,)))

    def prune_sessions(self, now_ms: int) -> int:
        return int(self._write("prune_sessions", lambda c: c.execute(
            "DELETE FROM sessions WHERE expires_ms < ?", (int(now_ms),)).rowcount))
