"""The SQLite store's connections: one per thread (opened, configured, closed when their thread ended),
the write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any failure, this process's writers
one at a time), and sqlite3's errors wrapped into the store's: locked/unreachable database ->
StoreUnavailable (the ingest retries), everything else StoreError. Moved out of hub/store/sqlite.py."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Callable, List, Optional, Tuple, TypeVar

from hub.errors import StoreError, StoreUnavailable

T = TypeVar("T")

log = logging.getLogger("hub.store.sqlite")

SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
PAGE_SIZE = 4096                    # new databases only (SQLite keeps an existing file's page size)
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # a restarted WAL file is truncated back to this
_UNAVAILABLE_HINTS = ("locked", "busy", "unable to open", "disk i/o", "readonly", "read-only",
                      "no such table", "disk is full")


def wrap(exc: sqlite3.Error, what: str) -> Exception:
    msg = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and any(h in msg for h in _UNAVAILABLE_HINTS):
        return StoreUnavailable(f"SQLite store unavailable during {what}: {exc}")
    return StoreError(f"SQLite store error during {what}: {exc}")


class Connections:
    """``own_checkpoints``: the store checkpoints on a thread of its own (wal_autocheckpoint off)."""

    def __init__(self, path: Path, busy_timeout_ms: int, synchronous: str, own_checkpoints: bool) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous
        self.own_checkpoints = own_checkpoints
        self.write_lock = threading.Lock()  # this process's writers, so a checkpoint can catch up
        self._local = threading.local()
        self.conns: List[Tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self.closed = False

    def open(self) -> sqlite3.Connection:
        """A new configured connection (raises sqlite3.Error); the caller owns it."""
        conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_ms / 1000.0,
                               isolation_level=None, check_same_thread=False)
        self.configure(conn)
        return conn

    def configure(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # a no-op unless the file is new
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        if self.own_checkpoints:
            conn.execute("PRAGMA wal_autocheckpoint = 0")

    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        if self.closed:
            raise StoreError("the SQLite store is closed")
        conn: Optional[sqlite3.Connection] = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self.open()
            except sqlite3.Error as exc:
                raise wrap(exc, f"open {self.path}") from exc
            self._local.conn = conn
            with self._conns_lock:
                # close the connections of threads that ended (HTTP servers use a thread per request)
                alive = []
                for thread, other in self.conns:
                    if thread.is_alive():
                        alive.append((thread, other))
                    else:
                        other.close()
                self.conns = alive + [(threading.current_thread(), conn)]
        return conn

    def run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self.conn())
        except sqlite3.Error as exc:
            raise wrap(exc, what) from exc

    def write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in one write transaction (BEGIN IMMEDIATE ... COMMIT)."""
        def tx(c: sqlite3.Connection) -> T:
            c.execute("BEGIN IMMEDIATE")
            try:
                out = fn(c)
                c.execute("COMMIT")
            except BaseException:
                # also when COMMIT itself failed (busy, I/O error): a transaction left open would make
                # every later write on this connection fail with "cannot start a transaction within a
                # transaction"
                if c.in_transaction:
                    try:
                        c.execute("ROLLBACK")
                    except sqlite3.Error as exc:  # the connection is unusable: drop it, open anew
                        log.error("ROLLBACK after a failed %s failed too (%s); reopening the connection",
                                  what, exc)
                        self.drop(c)
                raise
            return out
        with self.write_lock:
            return self.run(what, tx)

    def drop(self, conn: sqlite3.Connection) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._conns_lock:
            self.conns = [(t, c) for t, c in self.conns if c is not conn]
        try:
            conn.close()
        except sqlite3.Error:  # pragma: no cover
            pass

    def close(self) -> None:
        self.closed = True
        with self._conns_lock:
            conns, self.conns = self.conns, []
        for _, c in conns:
            try:
                c.close()
            except sqlite3.Error:  # pragma: no cover
                pass
