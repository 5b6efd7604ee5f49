"""The storage contract for bundle blobs (hub/store/base.py, hub/store/blobs.py), run against every backend of
tests/hub/test_store_contract.py: SQLite (files next to the database), MongoDB through mongomock (GridFS
bucket ``bundles``) and a real MongoDB when KESTREL_MONGODB_URI is set."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hub.errors import BundleBytesMissing, StoreError, StoreUnavailable
from hub.store import blobs as blobmod
from hub.store.base import Store
from hub.store.mongo import MongoStore
from hub.store.sqlite import SqliteStore
from tests.hub.test_store_contract import mongo_store, store  # noqa: F401  (the fixtures, every backend)


def blob(n: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_open_has_delete_roundtrip(store: Store) -> None:  # noqa: F811
    data = blob(3 * 1024 * 1024 + 17)  # several GridFS chunks and several copy chunks
    name = sha(data)
    assert not store.has_blob(name)
    with pytest.raises(BundleBytesMissing, match=name[:16]):
        store.open_blob(name)
    store.put_blob(name, io.BytesIO(data), len(data))
    assert store.has_blob(name)
    with store.open_blob(name) as f:
        assert f.read() == data
    with store.open_blob(name) as f:  # the registry resumes a fetch from an offset
        f.seek(2 * 1024 * 1024 + 5)
        assert f.read(1000) == data[2 * 1024 * 1024 + 5:2 * 1024 * 1024 + 1005]
        assert f.read(10**9) == data[2 * 1024 * 1024 + 1005:]
        assert f.read(10) == b""
    assert store.delete_blob(name) is True and not store.has_blob(name)
    assert store.delete_blob(name) is False


def test_put_is_idempotent_and_keeps_the_first_copy(store: Store) -> None:  # noqa: F811
    data = blob(1000, 1)
    store.put_blob(sha(data), io.BytesIO(data), len(data))

    class Unread(io.BytesIO):
        def read(self, *a: Any) -> bytes:
            raise AssertionError("a blob kept already is not written again")
    store.put_blob(sha(data), Unread(), len(data))
    assert store.open_blob(sha(data)).read() == data


@pytest.mark.parametrize("what", ["other bytes", "short", "long"])
def test_bytes_that_are_not_the_named_blob_are_refused_and_nothing_is_kept(store: Store, what: str) -> None:  # noqa: F811
    data = blob(5000, 2)
    src, size = {"other bytes": (blob(5000, 3), 5000), "short": (data[:4000], 5000),
                 "long": (data + b"x", 5000)}[what]
    with pytest.raises(StoreError, match="nothing kept"):
        store.put_blob(sha(data), io.BytesIO(src), size)
    assert not store.has_blob(sha(data))
    with pytest.raises(BundleBytesMissing):
        store.open_blob(sha(data))
    store.put_blob(sha(data), io.BytesIO(data), len(data))  # the right bytes still go in afterwards
    assert store.open_blob(sha(data)).read() == data


def test_names_are_sha256s(store: Store) -> None:  # noqa: F811
    for bad in ("../etc/passwd", "A" * 64, "ab" * 31, ""):
        with pytest.raises(StoreError, match="not a sha256"):
            store.has_blob(bad)
        with pytest.raises(StoreError, match="not a sha256"):
            store.put_blob(bad, io.BytesIO(b"x"), 1)


def test_a_source_failing_midway_keeps_nothing(store: Store) -> None:  # noqa: F811
    data = blob(3 * 1024 * 1024, 4)

    class Broken(io.BytesIO):
        calls = 0

        def read(self, *a: Any) -> bytes:
            self.calls += 1
            if self.calls > 1:
                raise OSError("the push's temp file went away")
            return super().read(*a)
    with pytest.raises(OSError):
        store.put_blob(sha(data), Broken(data), len(data))
    assert not store.has_blob(sha(data))
    store.put_blob(sha(data), io.BytesIO(data), len(data))
    assert store.open_blob(sha(data)).read() == data


# ---- SQLite: files next to the database ----

def test_sqlite_blobs_are_files_next_to_the_database_and_shared_with_it(tmp_path: Path) -> None:
    a = SqliteStore(tmp_path / "hub.db")
    data = blob(70000, 5)
    a.put_blob(sha(data), io.BytesIO(data), len(data))
    path = tmp_path / "hub.db-bundles" / f"{sha(data)}.kbundle"
    assert path.read_bytes() == data and oct(path.stat().st_mode & 0o777) == "0o644"
    b = SqliteStore(tmp_path / "hub.db")  # another worker on the same database: no folder of its own to share
    assert b.open_blob(sha(data)).read() == data
    a.close()
    b.close()


def test_sqlite_temp_files_of_dead_writers_go_those_of_live_ones_stay(tmp_path: Path) -> None:
    d = tmp_path / "hub.db-bundles"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = d / f"{blobmod.TEMP_PREFIX}{dead.pid}-x.tmp"
    live = d / f"{blobmod.TEMP_PREFIX}{os.getpid()}-y.tmp"  # another worker writing right now
    left.write_bytes(b"half")
    live.write_bytes(b"half")
    s = SqliteStore(tmp_path / "hub.db")
    assert not left.exists() and live.exists()
    s.close()


def test_sqlite_an_unwritable_folder_is_unavailable(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "hub.db")
    (tmp_path / "hub.db-bundles").write_text("a file where the folder should be")
    data = blob(10, 6)
    with pytest.raises(StoreUnavailable, match="hub.db-bundles"):
        s.put_blob(sha(data), io.BytesIO(data), len(data))
    s.close()


# ---- MongoDB: GridFS bucket "bundles" ----

def test_mongo_blobs_are_in_gridfs_with_their_name_and_size(mongo_store: MongoStore) -> None:  # noqa: F811
    data = blob(600 * 1024, 7)
    mongo_store.put_blob(sha(data), io.BytesIO(data), len(data))
    doc = mongo_store.db["bundles.files"].find_one({"filename": sha(data)})
    assert doc is not None and doc["length"] == len(data) and doc["metadata"] == {"sha256": sha(data),
                                                                                   "size": len(data)}
    assert mongo_store.db["bundles.chunks"].count_documents({"files_id": doc["_id"]}) == 3  # 255 KiB chunks


def test_mongo_an_upload_cut_off_leaves_no_blob_and_orphan_chunks_are_harmless(mongo_store: MongoStore) -> None:  # noqa: F811
    """A crash between chunks and file document (simulated: chunks written, no document) hides nothing
    and blocks nothing: the next upload has a fresh id."""
    data = blob(300 * 1024, 8)
    mongo_store.db["bundles.chunks"].insert_one({"files_id": "crashed-upload", "n": 0, "data": data[:1000]})
    assert not mongo_store.has_blob(sha(data))
    mongo_store.put_blob(sha(data), io.BytesIO(data), len(data))
    assert mongo_store.open_blob(sha(data)).read() == data


def test_mongo_two_workers_storing_one_blob_at_once_both_succeed(mongo_store: MongoStore,  # noqa: F811
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = blob(1000, 9)
    real_has = mongo_store.blobs.has
    monkeypatch.setattr(mongo_store.blobs, "has", lambda name: False)  # both looked before either stored
    mongo_store.put_blob(sha(data), io.BytesIO(data), len(data))
    mongo_store.put_blob(sha(data), io.BytesIO(data), len(data))
    monkeypatch.setattr(mongo_store.blobs, "has", real_has)
    assert mongo_store.db["bundles.files"].count_documents({"filename": sha(data)}) == 2
    assert mongo_store.open_blob(sha(data)).read() == data
    assert mongo_store.delete_blob(sha(data)) is True and not mongo_store.has_blob(sha(data))


def test_mongo_errors_while_reading_a_blob_are_store_errors(mongo_store: MongoStore,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pymongo.errors import AutoReconnect
    data = blob(1000, 10)
    mongo_store.put_blob(sha(data), io.BytesIO(data), len(data))
    reader = mongo_store.open_blob(sha(data))

    def down(*a: Any) -> bytes:
        raise AutoReconnect("connection reset")
    monkeypatch.setattr(reader._out, "read", down)  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable, match="connection reset"):
        reader.read(10)
    monkeypatch.setattr(mongo_store.blobs.fs, "exists", lambda **k: (_ for _ in ()).throw(AutoReconnect("gone")))
    with pytest.raises(StoreUnavailable, match="gone"):
        mongo_store.has_blob(sha(data))
