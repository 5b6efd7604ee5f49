"""Schema steps that bring a SQLite database of an older hub up to this one (PRAGMA user_version).

``SqliteStore`` runs :func:`migrate` when it opens a file, after creating what is missing. Each step is
idempotent and the whole run is one transaction (``BEGIN IMMEDIATE``), so two hubs opening the same file
at once do no harm; a database already at :data:`SCHEMA_VERSION` costs one PRAGMA read.

1. Device records (JSON docs) gain ``threshold``: the confidence threshold the device reports in force,
   0.0 = not reported yet (DeviceRecord's default).
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1


def _version(c: sqlite3.Connection) -> int:
    return int(c.execute("PRAGMA user_version").fetchone()[0])


def migrate(c: sqlite3.Connection) -> None:
    if _version(c) >= SCHEMA_VERSION:
        return
    c.execute("BEGIN IMMEDIATE")
    try:
        if _version(c) < 1:
            c.execute("UPDATE devices SET doc = json_set(doc, '$.threshold', 0.0) "
                      "WHERE json_extract(doc, '$.threshold') IS NULL")
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        c.execute("COMMIT")
    except BaseException:
        c.execute("ROLLBACK")
        raise
