"""The SQLite store's schema: its tables and indexes, the frame columns, and the migration of an older
hub's database (it gets the columns added since: its rows keep their images as BLOBs, their top-1
score is computed once; indexes that newer ones cover are dropped). Moved out of hub/store/sqlite.py.

Indexes (docs/hub.md): every order the label queue offers has an index that yields it directly, for
all frames and (partial) for the unlabelled ones, so the first page of 100,000 frames reads a page's
worth of index entries and never sorts.
"""

from __future__ import annotations

import dataclasses
import sqlite3

from hub.store.base import FrameRecord
from hub.store.sqlite_migrate import migrate

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
  labelled_ms INTEGER,
  image_segment TEXT,
  image_offset INTEGER,
  image_length INTEGER,
  image_sha256 TEXT,
  labelled_by TEXT,
  top_score REAL
);
CREATE INDEX IF NOT EXISTS frames_label_time ON frames (label, capture_time_ms DESC) WHERE label IS NOT NULL;
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
# where a frame's image is when it is in a segment file (hub/store/segments.py); NULL: in column image
SEGMENT_COLUMNS = ["image_segment", "image_offset", "image_length"]
# added by newer hubs (ALTERed into an older database at open): name -> type
ADDED_COLUMNS = {"image_segment": "TEXT", "image_offset": "INTEGER", "image_length": "INTEGER",
                 "image_sha256": "TEXT", "labelled_by": "TEXT", "top_score": "REAL"}

WEB_SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry_series (
  device_id TEXT NOT NULL,
  minute_ms INTEGER NOT NULL,
  time_ms INTEGER NOT NULL,
  doc TEXT NOT NULL,
  PRIMARY KEY (device_id, minute_ms)
);
CREATE INDEX IF NOT EXISTS series_minute ON telemetry_series (minute_ms);
CREATE TABLE IF NOT EXISTS tokens (
  name TEXT PRIMARY KEY,
  token_hash TEXT NOT NULL UNIQUE,
  role TEXT NOT NULL,
  created_ms INTEGER NOT NULL,
  revoked_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
  id_hash TEXT PRIMARY KEY,
  token_name TEXT NOT NULL,
  csrf TEXT NOT NULL,
  created_ms INTEGER NOT NULL,
  expires_ms INTEGER NOT NULL
);
"""

# Run after the columns of older databases were added (top_score is one of them). The indexes of older
# hubs whose columns are a prefix of these are dropped (each index costs every insert).
FRAME_INDEXES = """
DROP INDEX IF EXISTS frames_time;
DROP INDEX IF EXISTS frames_device_time;
DROP INDEX IF EXISTS frames_unlabelled_time;
CREATE INDEX IF NOT EXISTS frames_time_id ON frames (capture_time_ms DESC, frame_id DESC);
CREATE INDEX IF NOT EXISTS frames_device_time_id ON frames (device_id, capture_time_ms DESC, frame_id DESC);
CREATE INDEX IF NOT EXISTS frames_score_id ON frames (top_score, frame_id);
CREATE INDEX IF NOT EXISTS frames_unlabelled_time_id ON frames (capture_time_ms DESC, frame_id DESC)
  WHERE label IS NULL;
CREATE INDEX IF NOT EXISTS frames_unlabelled_score_id ON frames (top_score, frame_id) WHERE label IS NULL;
"""


def backfill_top_scores(c: sqlite3.Connection) -> None:
    """The top-1 score of the rows an older hub stored (as hub.store.query.top_score: 0.0 without scores)."""
    c.execute("UPDATE frames SET top_score = COALESCE((SELECT MAX(CAST(json_extract(value, '$.score') AS REAL)) "
              "FROM json_each(frames.top_k)), 0.0) WHERE top_score IS NULL")


def create_schema(c: sqlite3.Connection) -> None:
    c.executescript(SCHEMA + WEB_SCHEMA)
    have = {row[1] for row in c.execute("PRAGMA table_info(frames)")}
    for col, kind in ADDED_COLUMNS.items():
        if col not in have:  # a database of an older hub: its rows keep their images as BLOBs
            c.execute(f"ALTER TABLE frames ADD COLUMN {col} {kind}")
    if "top_score" not in have:
        backfill_top_scores(c)
    c.executescript(FRAME_INDEXES)
    migrate(c)
