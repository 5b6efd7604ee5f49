"""The SQLite store's WAL checkpoints, on a background thread of their own (moved out of
hub/store/sqlite.py; why: its module docstring and docs/adr/0005-hub-ingest-durability.md).

``wal_autocheckpoint`` is off on the store's connections, so a commit never stalls while the WAL is
copied into the database. A PASSIVE checkpoint never waits for anyone, but under continuous writes it
never quite catches up, and SQLite only restarts the WAL from its beginning once everything was copied.
So once the WAL is past WAL_RESET_BYTES the checkpointer copies the bulk without any lock, then holds
this process's writers (``Connections.write_lock``) for a second PASSIVE pass over the few pages
written meanwhile; the next commit then restarts the WAL. Readers are never waited for."""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Optional, Tuple

from hub.store.sqlite_conn import Connections

log = logging.getLogger("hub.store.sqlite")

CHECKPOINT_INTERVAL_S = 0.5         # how often the background checkpointer looks at the WAL
WAL_RESET_BYTES = 32 * 1024 * 1024  # from this WAL size on, a checkpoint catches up so the WAL restarts
WAL_HARD_BYTES = 512 * 1024 * 1024  # past this (other processes writing too), a blocking TRUNCATE checkpoint


class Checkpointer:
    """Started by the store's first write; ``interval_s`` 0 = none (SQLite's own checkpoints in commits)."""

    def __init__(self, db: Connections, interval_s: float) -> None:
        self.db = db
        self.interval_s = interval_s
        self.thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.checkpoints = 0
        self.catchups = 0

    def start(self) -> None:
        if self.interval_s <= 0 or self.thread is not None:
            return
        with self._lock:
            if self.thread is not None:
                return
            self.thread = threading.Thread(target=self._loop, name="sqlite-checkpoint", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)

    def _loop(self) -> None:
        """PASSIVE checkpoints (never block a writer) every interval; RESTART when the WAL is large.

        Every error is logged and retried at the next interval: this thread must never die, since
        the store's own connections do not checkpoint any more."""
        conn: Optional[sqlite3.Connection] = None
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                if conn is None:
                    conn = self.db.open()
                self.checkpoint_once(conn)
                if failing:
                    log.info("WAL checkpoints work again")
                failing = False
            except sqlite3.Error as exc:
                if not failing:
                    log.error("WAL checkpoint of %s failed (retrying every %.1fs): %s", self.db.path,
                              self.interval_s, exc)
                failing = True
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                pass
            conn.close()

    def checkpoint_once(self, c: sqlite3.Connection) -> Tuple[int, int]:
        """One checkpoint step: (WAL frames, frames checkpointed)."""
        page = int(c.execute("PRAGMA page_size").fetchone()[0])
        _, wal_frames, done = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        wal_bytes = int(wal_frames) * (page + 24)
        if wal_bytes >= WAL_RESET_BYTES:
            with self.db.write_lock:  # only the pages committed during the pass above are left to copy
                _, wal_frames, done = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.catchups += 1
        if wal_bytes >= WAL_HARD_BYTES:
            # other processes keep writing: make room the blocking way (waits for their writers)
            log.warning("the WAL of %s is %d MB; running a blocking checkpoint", self.db.path, wal_bytes >> 20)
            _, wal_frames, done = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return int(wal_frames), int(done)
