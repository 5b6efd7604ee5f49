"""The SQLite store's schema: its tables and indexes, the frame columns, and the one migration (an older
hub's database gets the segment-file columns; its rows keep their images as BLOBs). Moved out of
hub/store/sqlite.py."""

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
  image_sha256 TEXT
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
# where a frame's image is when it is in a segment file (hub/store/segments.py); NULL: in column image
SEGMENT_COLUMNS = ["image_segment", "image_offset", "image_length"]


def create_schema(c: sqlite3.Connection) -> None:
    c.executescript(SCHEMA)
    have = {row[1] for row in c.execute("PRAGMA table_info(frames)")}
    for col, kind in zip(SEGMENT_COLUMNS + ["image_sha256"], ("TEXT", "INTEGER", "INTEGER", "TEXT")):
        if col not in have:  # a database of an older hub: its rows keep their images as BLOBs
            c.execute(f"ALTER TABLE frames ADD COLUMN {col} {kind}")
    migrate(c)
