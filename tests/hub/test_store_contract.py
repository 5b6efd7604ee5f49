"""The storage contract (hub/store/base.py), run against every backend.

SQLite always runs. MongoDB runs only when KESTREL_MONGODB_URI points at a server
(e.g. KESTREL_MONGODB_URI=mongodb://localhost:27017/kestrel_test pytest -k store_contract);
each Mongo test uses a fresh database that is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
import types
import uuid
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest

from hub.errors import StoreError, StoreUnavailable
from hub.store.base import FrameRecord, GroupDesired, ModelRecord, Store
from hub.store.mongo import MongoStore
from hub.store.open import open_store
from hub.store.sqlite import SqliteStore
from tests.helpers.wait import wait_for
from tests.hub import jpeg

MONGO_URI = os.environ.get("KESTREL_MONGODB_URI", "")


@contextlib.contextmanager
def open_backend(kind: str, tmp_path: Path) -> Iterator[Store]:
    if kind == "sqlite":
        s: Store = open_store(f"sqlite:///{tmp_path / 'hub.db'}")
        yield s
        s.close()
        return
    if kind == "mongomock":
        yield mongomock_store()
        return
    if not MONGO_URI:
        pytest.skip("MongoDB contract tests need a server: set KESTREL_MONGODB_URI=mongodb://host:port/db "
                    "(no MongoDB server can run in this environment; the mongomock run covers the code)")
    dbname = f"kestrel_contract_{uuid.uuid4().hex[:8]}"
    m = MongoStore(MONGO_URI, database=dbname, timeout_ms=3000)
    yield m
    m.client.drop_database(dbname)
    m.close()


def _bulk_ignores_sort(builder: Any) -> None:
    """pymongo 4.11+ passes ``sort=`` to a bulk builder's add_update/add_replace; mongomock 4.3 does not
    know the argument (bulk_write raises TypeError). The store never sorts its bulk updates: drop it."""
    for name in ("add_update", "add_replace"):
        real = getattr(builder, name)
        if getattr(real, "_drops_sort", False):
            continue

        def shim(self: Any, *a: Any, _real: Any = real, sort: Any = None, **k: Any) -> Any:
            assert sort is None, "the store's bulk updates never sort"
            return _real(self, *a, **k)
        shim._drops_sort = True  # type: ignore[attr-defined]
        setattr(builder, name, shim)


def mongomock_store() -> MongoStore:
    """The Mongo backend on mongomock: a fake of pymongo's own MongoClient (GridFS included), fresh per call."""
    import mongomock
    import mongomock.collection
    import mongomock.gridfs
    mongomock.gridfs.enable_gridfs_integration()
    _bulk_ignores_sort(mongomock.collection.BulkOperationBuilder)
    return MongoStore.from_client(mongomock.MongoClient(), database="kestrel_contract")


@pytest.fixture(params=["sqlite", "mongomock", "mongo"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with open_backend(request.param, tmp_path) as s:
        yield s


@pytest.fixture(params=["mongomock", "mongo"])
def mongo_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MongoStore]:
    with open_backend(request.param, tmp_path) as s:
        assert isinstance(s, MongoStore)
        yield s


def rec(frame_id: str, device: str = "cam-1", t: int = 1000, image: bytes = b"") -> FrameRecord:
    return FrameRecord(frame_id=frame_id, device_id=device, capture_time_ms=t, received_ms=t + 5,
                       model_name="m", model_version=2, model_sha256="cd" * 32, reasons=["LOW_CONFIDENCE"],
                       top_k=[{"index": 1, "label": "dark", "score": 0.4}], image=image or jpeg(t),
                       image_format="jpeg", width=64, height=48, source="cam0", sequence=t)


def test_add_get_roundtrip_and_idempotent(store: Store) -> None:
    f = rec("f1")
    assert store.add_frame(f) is True
    assert store.add_frame(rec("f1", t=9999)) is False  # same frame_id: no change
    got = store.get_frame("f1")
    assert got == dataclasses.replace(f, image_sha256=hashlib.sha256(f.image).hexdigest())  # filled in
    assert store.count_frames() == 1
    assert store.get_frame("nope") is None


def test_add_frames_batch_reports_the_owner_of_existing_ids(store: Store) -> None:
    """None = stored now; an id that exists gives the device it is stored for, from the same call
    (the ingest tells a redelivery from another device's id without reading the frame back)."""
    assert store.add_frames([rec("a"), rec("b", device="cam-2")]) == [None, None]
    assert store.add_frames([rec("b"), rec("c"), rec("a", device="cam-9")]) == ["cam-2", None, "cam-1"]
    assert store.add_frames([rec("d", device="cam-3"), rec("d", device="cam-4")]) == [None, "cam-3"]
    assert store.count_frames() == 4
    assert store.get_frame("a").device_id == "cam-1"  # type: ignore[union-attr]  # not overwritten
    assert store.add_frames([]) == []


def test_apply_batch_writes_frames_devices_and_last_seen(store: Store) -> None:
    store.upsert_device("old", last_seen_ms=5000, state="online")
    store.add_frame(rec("x", device="old"))
    out = store.apply_batch([rec("n1", device="new"), rec("x", device="new")],
                            {"new": {"state": "online", "group": "g"}, "old": {"reported_version": 3}},
                            {"new": 7000, "old": 4000, "ghost": 1})
    assert out == [None, "old"]
    new, old = store.get_device("new"), store.get_device("old")
    assert new is not None and (new.state, new.group, new.last_seen_ms) == ("online", "g", 7000)
    assert old is not None and (old.state, old.reported_version, old.last_seen_ms) == ("online", 3, 5000)
    assert store.get_device("ghost") is None and store.count_frames() == 2
    assert store.apply_batch([], {}, {}) == []
    # a retry of the same batch changes nothing and reports both ids as stored
    assert store.apply_batch([rec("n1", device="new")], {"new": {"state": "online"}}, {"new": 7000}) == ["new"]
    assert store.count_frames() == 2


def test_apply_batch_refuses_unknown_device_fields_before_writing(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown or immutable"):
        store.apply_batch([rec("u1")], {"cam-1": {"colour": "red"}}, {})
    assert store.count_frames() == 0 and store.get_device("cam-1") is None


def test_list_filters_newest_first(store: Store) -> None:
    for i in range(6):
        store.add_frame(rec(f"x{i}", device="cam-1" if i % 2 else "cam-2", t=1000 + i))
    assert [f.frame_id for f in store.list_frames()] == [f"x{i}" for i in range(5, -1, -1)]
    assert [f.frame_id for f in store.list_frames(device_id="cam-1")] == ["x5", "x3", "x1"]
    assert store.count_frames("cam-2") == 3
    assert [f.frame_id for f in store.list_frames(since_ms=1004)] == ["x5", "x4"]
    page = store.list_frames(limit=2, offset=2)
    assert [f.frame_id for f in page] == ["x3", "x2"]
    assert all(f.image == b"" for f in page)  # images only when asked for
    assert store.list_frames(limit=1, with_images=True)[0].image == jpeg(1005)


def test_labels_and_iter_labelled(store: Store) -> None:
    for i in range(4):
        store.add_frame(rec(f"l{i}", t=2000 + i))
    assert store.set_label("l2", "cat", 5000) is True
    assert store.set_label("l0", "dog", 5001) is True
    assert store.set_label("missing", "cat", 1) is False
    assert [f.frame_id for f in store.list_frames(label="cat")] == ["l2"]
    assert [f.frame_id for f in store.list_frames(unlabelled=True)] == ["l3", "l1"]
    assert store.list_frames(label="cat", unlabelled=True) == []  # both conditions hold for no frame
    labelled = list(store.iter_labelled())
    assert [(f.frame_id, f.label) for f in labelled] == [("l0", "dog"), ("l2", "cat")]
    assert labelled[0].image == jpeg(2000) and labelled[0].labelled_ms == 5001
    assert store.set_label("l2", None, 6000) is True
    assert [f.frame_id for f in store.iter_labelled()] == ["l0"]
    assert store.get_frame("l2").labelled_ms is None  # type: ignore[union-attr]


def test_iter_labelled_pages_through_many_frames_in_order(store: Store) -> None:
    # 250 frames, 7 per capture time: pages (100 a query in both backends) end inside a run of equal times
    frames = [rec(f"p{i:03d}", t=1000 + i // 7, image=b"img%d" % i) for i in range(250)]
    assert store.add_frames(frames) == [None] * len(frames)
    for f in frames[::2]:
        store.set_label(f.frame_id, "cat", 1)
    got = list(store.iter_labelled())
    assert [f.frame_id for f in got] == [f.frame_id for f in frames[::2]]
    assert [f.image for f in got] == [f.image for f in frames[::2]]


def test_devices_upsert_merges(store: Store) -> None:
    d = store.upsert_device("cam-1", state="online", last_seen_ms=10)
    assert (d.device_id, d.state, d.group, d.last_seen_ms) == ("cam-1", "online", "default", 10)
    d = store.upsert_device("cam-1", group="lab", last_telemetry={"fps": 9.5})
    assert (d.state, d.group, d.last_telemetry) == ("online", "lab", {"fps": 9.5})
    store.upsert_device("cam-2")
    assert store.upsert_device("cam-1") == d  # no fields: creates nothing new, changes nothing
    assert store.get_device("cam-1") == d
    assert [x.device_id for x in store.list_devices()] == ["cam-1", "cam-2"]
    assert [x.device_id for x in store.list_devices("lab")] == ["cam-1"]
    assert store.get_device("nobody") is None
    with pytest.raises(StoreError):
        store.upsert_device("cam-1", no_such_field=1)


def test_device_desired_scope_roundtrip(store: Store) -> None:
    assert store.upsert_device("cam-1").desired_scope == ""
    d = store.upsert_device("cam-1", desired_model="m", desired_version=3, desired_scope="device")
    assert (d.desired_model, d.desired_version, d.desired_scope) == ("m", 3, "device")
    assert store.get_device("cam-1") == d
    store.upsert_device("cam-1", state="online")  # other fields leave it alone
    assert store.get_device("cam-1").desired_scope == "device"  # type: ignore[union-attr]


def test_device_enrolment_fields_roundtrip(store: Store) -> None:
    d = store.upsert_device("cam-e", enrolled_group="lobby", enrolled_ms=5, group="lobby")
    assert (d.enrolled_group, d.enrolled_ms, d.revoked_ms) == ("lobby", 5, 0)
    store.upsert_device("cam-e", state="online", group="elsewhere")  # a status: the enrolment stays
    store.upsert_device("cam-e", revoked_ms=9)
    got = store.get_device("cam-e")
    assert got is not None and (got.enrolled_group, got.enrolled_ms, got.revoked_ms, got.group) == \
        ("lobby", 5, 9, "elsewhere")


def test_device_threshold_roundtrip(store: Store) -> None:
    """The confidence threshold a device reports in force: 0.0 until it does, then what it said, kept when other
    fields change, and listed with the device."""
    assert store.upsert_device("cam-1", state="online").threshold == 0.0
    d = store.upsert_device("cam-1", threshold=0.71)
    assert d.threshold == 0.71 and store.get_device("cam-1") == d
    store.upsert_device("cam-1", state="offline", update_state="COMMITTED")
    assert store.get_device("cam-1").threshold == 0.71  # type: ignore[union-attr]
    store.apply_batch([], {"cam-2": {"state": "online", "threshold": 0.35}}, {})
    assert [(x.device_id, x.threshold) for x in store.list_devices()] == [("cam-1", 0.71), ("cam-2", 0.35)]


def test_group_desired_upsert_per_group(store: Store) -> None:
    assert store.get_group_desired("lab") is None
    g = store.set_group_desired("lab", "m", 4, False, 1000)
    assert g == GroupDesired("lab", "m", 4, False, 1000)
    assert store.get_group_desired("lab") == g
    store.set_group_desired("lab", "", 0, True, 2000)  # a later announcement replaces it
    store.set_group_desired("yard", "m", 2, False, 1500)
    assert store.get_group_desired("lab") == GroupDesired("lab", "", 0, True, 2000)
    assert store.get_group_desired("yard") == GroupDesired("yard", "m", 2, False, 1500)
    store.set_group_desired("yard", "m", 2, False, 1500)  # idempotent retry
    assert store.get_group_desired("yard") == GroupDesired("yard", "m", 2, False, 1500)
    assert store.get_group_desired("nobody") is None


def test_models(store: Store) -> None:
    m1 = ModelRecord("m", 1, "a" * 64, 100, 1, metrics={"acc": 0.9})
    m2 = ModelRecord("m", 2, "b" * 64, 200, 2)
    assert store.add_model(m1) and store.add_model(m2)
    assert store.add_model(ModelRecord("m", 1, "c" * 64, 1, 1)) is False
    store.add_model(ModelRecord("other", 7, "d" * 64, 1, 1))
    assert store.get_model("m", 1) == m1
    assert store.get_model("m", 3) is None
    assert [(r.model_name, r.version) for r in store.list_models("m")] == [("m", 2), ("m", 1)]
    assert len(store.list_models()) == 3


def test_large_image_roundtrip(store: Store) -> None:
    big = os.urandom(3 * 1024 * 1024)
    store.add_frame(rec("big", image=big))
    assert store.get_frame("big").image == big  # type: ignore[union-attr]


def test_ping_answers_and_tells_an_unreachable_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.ping()
    assert store.add_frame(rec("after-ping")) is True and store.count_frames() == 1
    if isinstance(store, SqliteStore):  # ping reads the database: a broken file is unavailable
        store._run("break", lambda c: c.execute("DROP TABLE frames"))
    else:
        from pymongo.errors import ServerSelectionTimeoutError

        def down(*a: Any, **k: Any) -> None:
            raise ServerSelectionTimeoutError("injected: no server")
        monkeypatch.setattr(store, "client", types.SimpleNamespace(admin=types.SimpleNamespace(command=down)))
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_touch_devices_only_raises_last_seen(store: Store) -> None:
    store.upsert_device("d1", last_seen_ms=5000, state="online")
    store.upsert_device("d2", last_seen_ms=100)
    store.touch_devices({"d1": 3000, "d2": 200, "ghost": 999})
    assert store.get_device("d1").last_seen_ms == 5000  # type: ignore[union-attr]  # not lowered
    assert store.get_device("d2").last_seen_ms == 200  # type: ignore[union-attr]
    assert store.get_device("d1").state == "online"  # type: ignore[union-attr]  # nothing else touched
    assert store.get_device("ghost") is None  # not created
    store.touch_devices({})


# ---- MongoDB specifics (mongomock always, a real server with KESTREL_MONGODB_URI) ----

@pytest.fixture
def small_inline(monkeypatch: pytest.MonkeyPatch) -> int:
    """Images over 1 KiB go to GridFS, so the GridFS path runs with small images."""
    import hub.store.mongo
    monkeypatch.setattr(hub.store.mongo, "INLINE_IMAGE_MAX", 1024)
    return 1024


def test_mongo_large_images_live_in_gridfs(mongo_store: MongoStore, small_inline: int) -> None:
    big, small = os.urandom(small_inline * 40), os.urandom(small_inline // 2)
    assert mongo_store.add_frame(rec("big", t=2, image=big)) is True
    assert mongo_store.add_frame(rec("small", t=1, image=small)) is True
    doc = mongo_store.frames.find_one({"frame_id": "big"})
    assert doc is not None and doc["image"] == b"" and doc["image_gridfs_id"] == "img:big"
    assert mongo_store.frames.find_one({"frame_id": "small"})["image"] == small  # type: ignore[index]
    assert mongo_store.fs.get("img:big").read() == big
    assert mongo_store.get_frame("big").image == big  # type: ignore[union-attr]
    assert [f.image for f in mongo_store.list_frames(with_images=True)] == [big, small]
    assert [f.image for f in mongo_store.list_frames()] == [b"", b""]
    mongo_store.set_label("big", "cat", 5)
    assert [f.image for f in mongo_store.iter_labelled()] == [big]


def test_mongo_gridfs_frames_are_idempotent(mongo_store: MongoStore, small_inline: int) -> None:
    big = os.urandom(small_inline * 3)
    assert mongo_store.add_frame(rec("g1", image=big)) is True
    assert mongo_store.add_frame(rec("g1", image=os.urandom(small_inline * 3))) is False  # redelivery
    assert mongo_store.add_frames([rec("g1", image=big), rec("g2", image=big)]) == ["cam-1", None]
    assert mongo_store.fs.get("img:g1").read() == big  # the first copy stays
    assert mongo_store.db["images.files"].count_documents({}) == 2
    assert mongo_store.count_frames() == 2


def test_mongo_gridfs_retry_after_a_crash_between_file_and_document(mongo_store: MongoStore,
                                                                     small_inline: int) -> None:
    big = os.urandom(small_inline * 3)
    mongo_store.fs.put(big, _id="img:c1", filename="c1")  # a worker died after storing the image only
    assert mongo_store.add_frame(rec("c1", image=big)) is True
    assert mongo_store.get_frame("c1").image == big  # type: ignore[union-attr]


def test_mongo_gridfs_file_stored_by_another_worker_meanwhile(mongo_store: MongoStore, small_inline: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    big = os.urandom(small_inline * 3)
    mongo_store.fs.put(big, _id="img:r1", filename="r1")
    monkeypatch.setattr(mongo_store.fs, "exists", lambda *a, **k: False)  # lost the exists/put race
    assert mongo_store.add_frames([rec("r1", image=big)]) == [None]
    assert mongo_store.get_frame("r1").image == big  # type: ignore[union-attr]


def test_mongo_unencodable_values_are_store_errors(mongo_store: MongoStore) -> None:
    """bson refuses the document before it reaches the server: still a StoreError, nothing stored."""
    with pytest.raises(StoreError, match="MongoDB error during upsert_device"):
        mongo_store.upsert_device("cam-1", last_telemetry={"fps": object()})
    assert mongo_store.get_device("cam-1") is None


def test_mongo_write_concern_error_is_not_a_stored_batch(mongo_store: MongoStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The server took the documents but could not confirm majority + journal: the batch must not be
    reported as stored (the ingest would acknowledge frames that a failover can lose). pymongo reports
    it as a BulkWriteError with writeConcernErrors; no replica set runs here, so the error is injected."""
    from pymongo.errors import BulkWriteError

    def insert_many(docs, ordered=True):  # noqa: ANN001, ANN202
        raise BulkWriteError({"writeErrors": [], "nInserted": len(docs),
                              "writeConcernErrors": [{"code": 64, "errmsg": "waiting for replication timed out"}]})

    monkeypatch.setattr(mongo_store.frames, "insert_many", insert_many)
    with pytest.raises(StoreUnavailable, match="write concern"):
        mongo_store.add_frames([rec("wc1"), rec("wc2")])


def test_mongo_apply_batch_is_one_write_per_collection(mongo_store: MongoStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[str] = []
    for coll in (mongo_store.frames, mongo_store.devices):
        for name in ("insert_many", "insert_one", "bulk_write", "update_one", "find_one_and_update"):
            real = getattr(coll, name)
            monkeypatch.setattr(coll, name, lambda *a, _r=real, _n=f"{coll.name}.{name}", **k:
                                (calls.append(_n), _r(*a, **k))[1])
    mongo_store.apply_batch([rec("m1"), rec("m2", device="cam-2")], {"cam-1": {"state": "online"}, "cam-2": {}},
                            {"cam-1": 5, "cam-2": 6})
    assert calls == ["frames.insert_many", "devices.bulk_write"]
    mongo_store.touch_devices({"cam-1": 7, "cam-2": 8})
    assert calls[-1] == "devices.bulk_write" and len(calls) == 3
    assert [mongo_store.get_device(d).last_seen_ms for d in ("cam-1", "cam-2")] == [7, 8]  # type: ignore[union-attr]


def test_mongo_from_client_uses_the_given_database() -> None:
    s = mongomock_store()
    s.add_model(ModelRecord("m", 1, "a" * 64, 1, 1))
    assert s.db.name == "kestrel_contract" and s.client["kestrel_contract"]["models"].count_documents({}) == 1
    assert {"frame_id_1"} <= set(s.frames.index_information())
    s.close()


# ---- SQLite specifics ----

def test_sqlite_threads_and_second_process_handle(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "shared.db"
    a, b = SqliteStore(path), SqliteStore(path)  # two handles = two processes' view of one file
    errors = []

    def writer(store: SqliteStore, prefix: str) -> None:
        try:
            for i in range(50):
                store.add_frames([rec(f"{prefix}{i}", t=i), rec(f"common{i}", t=i)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, p)) for s, p in ((a, "a"), (b, "b"), (a, "c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert a.count_frames() == 200  # 3 x 50 own + 50 shared ids stored exactly once
    mode = sqlite3.connect(str(path)).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    a.close()
    b.close()


def test_sqlite_locked_database_is_unavailable(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "locked.db"
    s = SqliteStore(path, busy_timeout_ms=50)
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable):
            s.add_frame(rec("z"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert s.add_frame(rec("z")) is True
    s.close()


def test_sqlite_failed_commit_leaves_no_open_transaction(tmp_path) -> None:  # noqa: ANN001
    """A COMMIT that fails (here: a deferred foreign-key check, as a full disk or an I/O error would)
    must be rolled back; else every later write on that connection fails with "cannot start a
    transaction within a transaction"."""
    s = SqliteStore(tmp_path / "c.db")
    s._run("setup", lambda c: c.executescript(
        "PRAGMA foreign_keys = ON; CREATE TEMP TABLE p (id INTEGER PRIMARY KEY);"
        "CREATE TEMP TABLE ch (pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED);"))
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        s._write("orphan", lambda c: c.execute("INSERT INTO ch VALUES (42)"))
    assert not s._conn().in_transaction
    assert s.add_frame(rec("next")) is True and s.count_frames() == 1
    s.close()


def test_sqlite_apply_batch_is_one_transaction(tmp_path) -> None:  # noqa: ANN001
    """Frames, device upserts and last_seen raises of a batch: one COMMIT (one fsync with FULL), and a
    failure anywhere in it leaves nothing behind."""
    s = SqliteStore(tmp_path / "tx.db")
    s.upsert_device("cam-1")
    statements: List[str] = []
    s._conn().set_trace_callback(statements.append)
    s.apply_batch([rec(f"t{i}") for i in range(20)], {"cam-1": {"state": "online"}, "cam-2": {}},
                  {"cam-1": 9, "cam-2": 9})
    assert [q for q in statements if q in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
    bad = rec("t-bad")
    bad.image_format = None  # type: ignore[assignment]  # NOT NULL: refused inside the transaction
    with pytest.raises(StoreError, match="t-bad"):
        s.apply_batch([rec("t-new"), bad], {"cam-3": {"state": "online"}}, {"cam-1": 99})
    assert s.get_frame("t-new") is None and s.get_device("cam-3") is None
    assert s.get_device("cam-1").last_seen_ms == 9  # type: ignore[union-attr]
    s.close()


def test_stage_frames_then_apply_batch(store: Store) -> None:
    """Writing ahead is optional and idempotent: staged or not, stored once, read back the same."""
    frames = [rec("s1"), rec("s2", device="cam-2")]
    store.stage_frames(frames)
    store.stage_frames(frames[:1])  # staged twice (a retried stage): still one record
    assert store.apply_batch(frames + [rec("s3")], {}, {}) == [None, None, None]
    assert store.apply_batch([rec("s1")], {}, {}) == ["cam-1"]
    assert [store.get_frame(f"s{i}").image for i in (1, 2, 3)] == [jpeg(1000)] * 3  # type: ignore[union-attr]


def _segment_row(s: SqliteStore, frame_id: str) -> Tuple[Any, ...]:
    return tuple(s._run("row", lambda c: c.execute(
        "SELECT length(image), image_segment, image_offset, image_length, image_sha256 FROM frames "
        "WHERE frame_id = ?", (frame_id,)).fetchone()))


def test_sqlite_images_are_in_segment_files_fsynced_before_the_row(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """One write and one fdatasync of the batch's images, then the rows (segment, offset, length, sha256)
    in one transaction: a committed row never points at bytes that were not on disk first."""
    import hub.store.segments as seg
    s = SqliteStore(tmp_path / "seg.db")
    events: List[str] = []
    real_sync = seg.os.fdatasync
    monkeypatch.setattr(seg.os, "fdatasync", lambda fd: (events.append("fdatasync"), real_sync(fd))[1])
    s._conn().set_trace_callback(lambda q: events.append(q) if q == "COMMIT" else None)
    images = [os.urandom(3000 + i) for i in range(3)]
    assert s.add_frames([rec(f"i{i}", image=img) for i, img in enumerate(images)]) == [None] * 3
    assert events == ["fdatasync", "COMMIT"]
    blob_len, name, offset, length, sha = _segment_row(s, "i1")
    assert blob_len == 0 and (offset, length, sha) == (3000, 3001, hashlib.sha256(images[1]).hexdigest())
    with open(tmp_path / "seg.db-images" / name, "rb") as f:
        assert f.read() == b"".join(images)
    assert [s.get_frame(f"i{i}").image for i in range(3)] == images  # type: ignore[union-attr]
    events.clear()
    assert s.add_frames([rec("i0", image=images[0])]) == ["cam-1"]  # a redelivery: no image written again
    assert events == ["COMMIT"] and os.path.getsize(tmp_path / "seg.db-images" / name) == sum(map(len, images))
    s.close()


def test_sqlite_images_written_ahead_are_not_written_again(tmp_path) -> None:  # noqa: ANN001
    s = SqliteStore(tmp_path / "ahead.db")
    frames = [dataclasses.replace(rec(f"a{i}", image=bytes([i]) * 900), image_sha256=hashlib.sha256(bytes([i]) * 900)
                                  .hexdigest()) for i in range(3)]
    s.stage_frames(frames)
    assert s.segments.appends == 1
    other = rec("a1", image=b"another image of the same id")  # not the bytes written ahead: written itself
    assert s.apply_batch([frames[0], frames[2], other], {}, {}) == [None, None, None]
    assert s.segments.appends == 2 and s._staged == {}
    assert [s.get_frame(f"a{i}").image for i in range(3)] == [b"\0" * 900, b"another image of the same id",  # type: ignore[union-attr]
                                                              b"\2" * 900]
    s.close()


def test_sqlite_a_wrong_image_sha256_from_a_caller_is_not_trusted(tmp_path) -> None:  # noqa: ANN001
    s = SqliteStore(tmp_path / "trust.db")
    s.add_frame(dataclasses.replace(rec("w1", image=b"pixels"), image_sha256="0" * 64))
    got = s.get_frame("w1")
    assert got is not None and got.image == b"pixels" and got.image_sha256 == hashlib.sha256(b"pixels").hexdigest()
    s.close()


def test_sqlite_orphan_image_bytes_after_a_failed_commit_are_harmless(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The images went to disk, then the commit failed (a crash would be the same): nothing points at
    those bytes, and the retry stores the frame and reads it back intact."""
    s = SqliteStore(tmp_path / "orphan.db")
    real = s._write

    def failing(what: str, fn: Any) -> Any:
        raise StoreUnavailable("injected: crash before the commit")
    monkeypatch.setattr(s, "_write", failing)
    with pytest.raises(StoreUnavailable):
        s.add_frames([rec("o1", image=b"first-copy" * 100)])
    monkeypatch.setattr(s, "_write", real)
    assert s.count_frames() == 0
    assert s.add_frames([rec("o1", image=b"first-copy" * 100)]) == [None]
    assert s.get_frame("o1").image == b"first-copy" * 100  # type: ignore[union-attr]
    assert _segment_row(s, "o1")[2] == 1000  # after the orphan copy
    s.close()


def test_sqlite_damaged_or_missing_image_bytes_are_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    s = SqliteStore(tmp_path / "dmg.db")
    s.add_frames([rec("d1", image=b"a" * 500), rec("d2", image=b"b" * 500)])
    path = tmp_path / "dmg.db-images" / _segment_row(s, "d1")[1]
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"frame 'd1'.*does not match its sha256"):
        s.get_frame("d1")
    assert s.get_frame("d2").image == b"b" * 500  # type: ignore[union-attr]  # its neighbour is intact
    assert [f.frame_id for f in s.list_frames()] == ["d2", "d1"] or s.count_frames() == 2  # rows still list
    path.write_bytes(bytes(data[:700]))
    with pytest.raises(StoreError, match=r"frame 'd2'.*holds 200 of the 500 bytes"):
        s.get_frame("d2")
    path.unlink()
    with pytest.raises(StoreError, match=r"frame 'd1'.*is missing"):
        s.get_frame("d1")
    s.close()


def test_sqlite_a_failed_image_write_starts_a_new_segment(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import errno

    import hub.store.segments as seg
    s = SqliteStore(tmp_path / "full.db")
    s.add_frame(rec("f1", image=b"x" * 100))
    first = _segment_row(s, "f1")[1]
    real = seg.os.writev

    def full(fd: int, bufs: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(seg.os, "writev", full)
    with pytest.raises(StoreUnavailable, match="No space left"):
        s.add_frame(rec("f2", image=b"y" * 100))
    monkeypatch.setattr(seg.os, "writev", real)
    s.add_frame(rec("f2", image=b"y" * 100))
    assert _segment_row(s, "f2")[1] != first and _segment_row(s, "f2")[2] == 0
    assert [s.get_frame(f).image for f in ("f1", "f2")] == [b"x" * 100, b"y" * 100]  # type: ignore[union-attr]
    s.close()


def test_sqlite_segments_roll_over_and_other_processes_write_their_own(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import hub.store.segments as seg
    monkeypatch.setattr(seg, "SEGMENT_MAX_BYTES", 1000)
    a, b = SqliteStore(tmp_path / "roll.db"), SqliteStore(tmp_path / "roll.db")
    for i in range(4):
        a.add_frame(rec(f"a{i}", image=bytes([i]) * 600))
        b.add_frame(rec(f"b{i}", image=bytes([i + 10]) * 600))
    names = {p: {_segment_row(a, f"{p}{i}")[1] for i in range(4)} for p in "ab"}
    assert len(names["a"]) == len(names["b"]) == 2 and not names["a"] & names["b"]  # 600 + 600 bytes each
    assert len(list((tmp_path / "roll.db-images").iterdir())) == 4
    assert [a.get_frame(f"b{i}").image for i in range(4)] == [bytes([i + 10]) * 600 for i in range(4)]  # type: ignore[union-attr]
    a.close()
    b.close()


def test_sqlite_database_with_blob_images_still_reads(tmp_path) -> None:  # noqa: ANN001
    """A database of an older hub keeps its images as BLOBs: they read as before (no migration of the
    bytes; their image_sha256 is unknown: ""), new frames go to segment files, and listing/export see both."""
    path = tmp_path / "blobs.db"
    db = sqlite3.connect(str(path))
    db.executescript("""CREATE TABLE frames (frame_id TEXT PRIMARY KEY, device_id TEXT NOT NULL,
      capture_time_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, model_name TEXT NOT NULL,
      model_version INTEGER NOT NULL, model_sha256 TEXT NOT NULL, reasons TEXT NOT NULL, top_k TEXT NOT NULL,
      image BLOB NOT NULL, image_format TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
      source TEXT NOT NULL DEFAULT '', sequence INTEGER NOT NULL DEFAULT 0, label TEXT, labelled_ms INTEGER);""")
    db.execute("INSERT INTO frames VALUES ('old', 'cam-1', 5, 5, 'm', 1, '', '[]', '[]', ?, 'jpeg', 1, 1, '', 0, "
               "'cat', 6)", (b"old-blob-image",))
    db.commit()
    db.close()
    s = SqliteStore(path)
    old = s.get_frame("old")
    assert old is not None and (old.image, old.image_sha256) == (b"old-blob-image", "")
    s.add_frame(rec("new", t=7, image=b"new-image"))
    s.set_label("new", "dog", 8)
    assert _segment_row(s, "new")[1] and _segment_row(s, "old")[1] is None
    assert [(f.frame_id, f.image) for f in s.iter_labelled()] == [("old", b"old-blob-image"), ("new", b"new-image")]
    s.close()


def test_sqlite_durability_settings(tmp_path) -> None:  # noqa: ANN001
    """FULL by default (an acknowledged frame survives a power loss), NORMAL only when asked for;
    4 KiB pages for a new file (rows are small: the images are in segment files); checkpoints off the
    commit path."""
    safe = SqliteStore(tmp_path / "safe.db")
    pragma = lambda st, name: st._run(name, lambda c: c.execute(f"PRAGMA {name}").fetchone()[0])  # noqa: E731
    assert pragma(safe, "synchronous") == 2  # FULL
    assert pragma(safe, "page_size") == 4096 and pragma(safe, "wal_autocheckpoint") == 0
    fast = open_store(f"sqlite:///{tmp_path / 'fast.db'}", sqlite_synchronous="NORMAL")
    assert pragma(fast, "synchronous") == 1
    with pytest.raises(StoreError, match="synchronous"):
        SqliteStore(tmp_path / "x.db", synchronous="OFF")
    own = SqliteStore(tmp_path / "own.db", checkpoint_interval_s=0)  # SQLite's own checkpoints
    assert pragma(own, "wal_autocheckpoint") == 1000
    for st in (safe, fast, own):
        st.close()


def test_sqlite_checkpoints_keep_the_wal_bounded(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Under continuous writes a PASSIVE checkpoint never catches up by itself; past WAL_RESET_BYTES the
    checkpointer finishes the copy while holding this process's writers, so the next commit restarts
    the WAL from its beginning (a few pages) instead of appending for ever."""
    import hub.store.sqlite_checkpoint as ck
    monkeypatch.setattr(ck, "WAL_RESET_BYTES", 256 * 1024)
    s = SqliteStore(tmp_path / "w.db", checkpoint_interval_s=3600)  # checkpoints only when we say
    image = os.urandom(50 * 1024)
    for i in range(40):  # ~1 MB of WAL (rows and index pages: the images are in segment files)
        s.add_frame(rec(f"w{i}", t=i, image=image))
    frames_before, _ = s.checkpoint_once()
    assert frames_before >= 40
    assert s.checkpoint_catchups == 1
    s.add_frame(rec("after", t=99, image=image))
    frames_after, done = s.checkpoint_once()
    assert frames_after < 15 and done == frames_after  # restarted at the beginning (one frame: a few pages)
    assert s.count_frames() == 41
    s.close()


def test_sqlite_background_checkpointer_runs(tmp_path) -> None:  # noqa: ANN001
    s = SqliteStore(tmp_path / "b.db", checkpoint_interval_s=0.02)
    s.add_frame(rec("b1"))
    wait_for(lambda: s.checkpoints >= 2, 10, what="background checkpoints")
    s.close()
    assert s._wal.thread is not None and not s._wal.thread.is_alive()


def test_sqlite_indexes_exist(tmp_path) -> None:  # noqa: ANN001
    s = SqliteStore(tmp_path / "i.db")
    db = sqlite3.connect(str(s.path))
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"frames_device_time_id", "frames_label_time", "frames_unlabelled_time_id", "frames_time_id",
            "frames_score_id", "frames_unlabelled_score_id"} <= names
    assert not {"frames_device_time", "frames_unlabelled_time", "frames_time"} & names  # prefixes of the above
    plan = " ".join(str(r) for r in sqlite3.connect(str(s.path)).execute(
        "EXPLAIN QUERY PLAN SELECT frame_id FROM frames WHERE device_id = 'x' ORDER BY capture_time_ms DESC"))
    assert "frames_device_time_id" in plan
    s.close()


def test_sqlite_database_of_an_older_hub_still_opens(tmp_path) -> None:  # noqa: ANN001
    """A file made before the groups table and desired_scope existed: opened, migrated, nothing lost."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(str(path))
    db.executescript("CREATE TABLE devices (device_id TEXT PRIMARY KEY, doc TEXT NOT NULL, grp TEXT NOT NULL);")
    db.execute("INSERT INTO devices VALUES ('cam-9', ?, 'lab')",
               ('{"device_id": "cam-9", "group": "lab", "desired_model": "m", "desired_version": 2}',))
    db.commit()
    db.close()
    s = SqliteStore(path)
    dev = s.get_device("cam-9")
    assert dev is not None and (dev.desired_model, dev.desired_version, dev.desired_scope) == ("m", 2, "")
    assert s.get_group_desired("lab") is None
    s.set_group_desired("lab", "m", 3, False, 1)
    assert s.get_group_desired("lab") == GroupDesired("lab", "m", 3, False, 1)
    s.close()


def test_sqlite_device_records_of_an_older_hub_gain_the_threshold(tmp_path) -> None:  # noqa: ANN001
    """A hub before DeviceRecord.threshold wrote device docs without it: opening the file migrates them (0.0 =
    not reported), once (PRAGMA user_version), and a doc with a field this hub does not know still reads."""
    from hub.store.sqlite_migrate import SCHEMA_VERSION

    path = tmp_path / "pre-threshold.db"
    db = sqlite3.connect(str(path))
    db.executescript("CREATE TABLE devices (device_id TEXT PRIMARY KEY, doc TEXT NOT NULL, grp TEXT NOT NULL);")
    db.execute("INSERT INTO devices VALUES ('cam-7', ?, 'lab')",
               ('{"device_id": "cam-7", "group": "lab", "state": "online", "reported_version": 4}',))
    db.commit()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    s = SqliteStore(path)
    dev = s.get_device("cam-7")
    assert dev is not None and (dev.group, dev.reported_version, dev.threshold) == ("lab", 4, 0.0)
    s.upsert_device("cam-7", threshold=0.64)
    s.close()
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    doc = json.loads(db.execute("SELECT doc FROM devices WHERE device_id = 'cam-7'").fetchone()[0])
    assert doc["threshold"] == 0.64
    # a newer hub's field (unknown here) does not make the record unreadable
    db.execute("INSERT INTO devices VALUES ('cam-8', ?, 'lab')", ('{"device_id": "cam-8", "group": "lab", '
                                                                 '"threshold": 0.5, "from_the_future": 1}',))
    db.commit()
    db.close()
    s = SqliteStore(path)   # already migrated: nothing rewritten
    assert s.get_device("cam-7").threshold == 0.64  # type: ignore[union-attr]
    assert s.get_device("cam-8").threshold == 0.5  # type: ignore[union-attr]
    s.close()


def test_open_store_urls(tmp_path) -> None:  # noqa: ANN001
    s = open_store(str(tmp_path / "plain.db"))
    assert isinstance(s, SqliteStore) and s.path == (tmp_path / "plain.db").resolve()
    s.close()
    from hub.errors import ConfigError
    with pytest.raises(ConfigError):
        open_store("postgres://x/y")


def test_sqlite_closes_connections_of_finished_threads(tmp_path) -> None:  # noqa: ANN001
    s = SqliteStore(tmp_path / "t.db")
    for _ in range(20):
        t = threading.Thread(target=s.count_frames)
        t.start()
        t.join()
    s.count_frames()
    assert len(s._db.conns) <= 2  # this thread's, plus at most the last finished one until the next open
    s.close()


def test_mongo_unreachable_is_store_unavailable() -> None:
    """No server here, but the wrapping of pymongo's errors is real: nothing listens on that port."""
    from tests.helpers.broker import free_port
    with pytest.raises(StoreUnavailable, match="MongoDB unavailable"):
        open_store(f"mongodb://127.0.0.1:{free_port()}/kestrel", timeout_ms=300)


# ---- the dashboard's queries (hub/store/query.py, series.py, authrecords.py): every backend alike ----

def qrec(frame_id: str, device: str = "cam-1", t: int = 1000, score: float = 0.5, version: int = 2,
         reasons: Tuple[str, ...] = ("LOW_CONFIDENCE",), model: str = "m") -> FrameRecord:
    r = rec(frame_id, device, t, image=b"img-" + frame_id.encode())
    return dataclasses.replace(r, model_name=model, model_version=version, reasons=list(reasons),
                               top_k=[{"index": 0, "label": "cat", "score": score},
                                      {"index": 1, "label": "dog", "score": score / 2}])


def ids(page: Any) -> List[str]:
    return [f.frame_id for f in page.frames]


def test_set_labels_records_who_and_when_and_returns_what_was_there(store: Store) -> None:
    store.add_frames([qrec("a"), qrec("b"), qrec("c")])
    assert store.set_labels({"a": "cat", "b": "dog", "ghost": "cat"}, 5000, by="alice") == {"a": None, "b": None}
    a = store.get_frame("a")
    assert a is not None and (a.label, a.labelled_ms, a.labelled_by) == ("cat", 5000, "alice")
    assert store.set_labels({"a": "dog", "b": None}, 6000, by="bob") == {"a": "cat", "b": "dog"}
    a, b = store.get_frame("a"), store.get_frame("b")
    assert a is not None and (a.label, a.labelled_ms, a.labelled_by) == ("dog", 6000, "bob")
    assert b is not None and (b.label, b.labelled_ms, b.labelled_by) == (None, None, "")  # cleared: nobody, never
    assert store.set_labels({}, 1, by="x") == {}
    assert store.set_label("c", "cat", 7000, by="carol") is True and store.set_label("nope", "cat", 1) is False
    assert [(f.frame_id, f.labelled_by) for f in store.iter_labelled()] == [("a", "bob"), ("c", "carol")]


def test_query_filters(store: Store) -> None:
    from hub.store.query import UNUSABLE_LABEL, FrameQuery
    store.add_frames([
        qrec("f1", "cam-1", 1001, 0.10, 1, ("LOW_CONFIDENCE", "LOW_MARGIN")),
        qrec("f2", "cam-2", 1002, 0.55, 2, ("LOW_MARGIN",)),
        qrec("f3", "cam-3", 1003, 0.30, 2, ("HIGH_ENTROPY",), model="other"),
        qrec("f4", "cam-1", 1004, 0.45, 2, ("TRIAL",)),
        qrec("f5", "cam-2", 1005, 0.59, 1),
    ])
    store.set_labels({"f4": "cat", "f5": UNUSABLE_LABEL}, 9, by="x")

    def q(**kw: Any) -> List[str]:
        return ids(store.query_frames(FrameQuery(**{"label_state": "any", **kw})))

    assert q() == ["f5", "f4", "f3", "f2", "f1"]
    assert q(label_state="unlabelled") == ["f3", "f2", "f1"]
    assert q(label_state="labelled") == ["f4"]  # "unusable" is a verdict, not a class
    assert q(label_state="unusable") == ["f5"]
    assert q(label="cat") == ["f4"] and q(label="cat", label_state="labelled") == ["f4"]
    assert q(device_ids=["cam-1", "cam-3"]) == ["f4", "f3", "f1"] and q(device_ids=[]) == []
    assert q(model_name="m", model_version=2) == ["f4", "f2"]
    assert q(model_version=1) == ["f5", "f1"]
    assert q(reason="LOW_MARGIN") == ["f2", "f1"] and q(reason="TRIAL") == ["f4"]
    assert q(max_score=0.45) == ["f3", "f1"]  # "below": strictly under
    assert q(min_score=0.45, max_score=0.59) == ["f4", "f2"]
    assert q(since_ms=1002, until_ms=1004) == ["f3", "f2"]
    assert q(order="least_confident") == ["f1", "f3", "f4", "f2", "f5"]
    assert q(order="least_confident", label_state="unlabelled", device_ids=["cam-2", "cam-3"]) == ["f3", "f2"]
    assert store.count_unlabelled() == 3


@pytest.mark.parametrize("order", ["newest", "least_confident"])
def test_query_keyset_pages_walk_ties_exactly_once(store: Store, order: str) -> None:
    """Pages end inside runs of equal capture times and equal scores; the frames labelled while a person
    walks the pages of the unlabelled queue never make a later page skip or repeat a frame."""
    from hub.store.query import FrameQuery
    frames = [qrec(f"k{i:03d}", f"cam-{i % 3}", 1000 + i // 4, score=round(0.1 + (i % 5) / 10, 1)) for i in range(60)]
    store.add_frames(frames)
    full = ids(store.query_frames(FrameQuery(order=order, limit=500)))
    assert sorted(full) == sorted(f.frame_id for f in frames)
    if order == "newest":
        key = {f.frame_id: (-f.capture_time_ms, [-ord(c) for c in f.frame_id]) for f in frames}
    else:
        key = {f.frame_id: (f.top_k[0]["score"], [ord(c) for c in f.frame_id]) for f in frames}  # type: ignore
    assert full == sorted(full, key=lambda i: key[i])
    walked: List[str] = []
    after = None
    while True:
        page = store.query_frames(FrameQuery(order=order, limit=7, after=after))
        assert len(page.frames) <= 7
        walked += ids(page)
        store.set_labels({f.frame_id: "cat" for f in page.frames[:3]}, 5, by="walker")  # labelled meanwhile
        if page.next is None:
            break
        after = page.next
    assert walked == full
    assert store.query_frames(FrameQuery(order=order, limit=60)).next is None  # an exact last page: no cursor


def test_query_refuses_bad_queries_and_cursors(store: Store) -> None:
    from hub.store.query import FrameQuery, QueryError, make_cursor
    store.add_frame(qrec("only"))
    for bad in (FrameQuery(order="random"), FrameQuery(label_state="maybe"), FrameQuery(limit=0),
                FrameQuery(limit=100000), FrameQuery(reason="BORED"), FrameQuery(after="!!not-base64"),
                FrameQuery(after=make_cursor("least_confident", 0.5, "x")),  # another order's cursor
                FrameQuery(label="cat", label_state="unlabelled"), FrameQuery(max_score=float("nan"))):
        with pytest.raises(QueryError):
            store.query_frames(bad)


def _tele(t: int, processed: int, version: int = 2, hist: Tuple[int, ...] = (1, 2)) -> dict:
    # the JSON form the ingest stores in last_telemetry (64-bit integers as strings)
    return {"device_id": "d", "time_ms": str(t), "fps": 9.5, "latency_p50_ms": 11.0, "latency_p95_ms": 20.5,
            "frames_processed": str(processed), "frames_sampled": "3", "frames_low_confidence": "7",
            "score_histogram": [str(h) for h in hist], "spool_frames": "4", "dead_letters": "1",
            "uptime_s": 30.0, "model": {"name": "m", "version": str(version)}}


def test_telemetry_series_one_point_per_device_and_minute(store: Store) -> None:
    from hub.store.series import point_from_telemetry as pt
    m = 1_700_000_040_000  # a minute boundary
    assert store.apply_batch([], {"d1": {"last_telemetry": _tele(m + 1000, 10)}, "d2": {"state": "online"}},
                             {"d1": m + 1000}, [pt("d1", _tele(m + 1000, 10))]) == []
    store.apply_batch([], {}, {}, [pt("d1", _tele(m + 5000, 20))])                # later, same minute: replaces
    store.apply_batch([], {}, {}, [pt("d1", _tele(m + 3000, 15))])                # older: never replaces
    store.apply_batch([], {}, {}, [pt("d1", _tele(m + 61000, 30, 3), m + 60500)])  # device clock ahead of the hub
    store.add_series([pt("d2", _tele(m + 2000, 5)), pt("d2", _tele(m + 2500, 6))])  # one call, same minute
    pts = store.list_series(m)
    assert [(p.device_id, p.minute_ms, p.time_ms, p.frames_processed) for p in pts] == [
        ("d1", m, m + 5000, 20), ("d1", m + 60000, m + 60500, 30), ("d2", m, m + 2500, 6)]
    p = pts[0]
    assert (p.model_name, p.model_version, p.fps, p.latency_p95_ms, p.frames_low_confidence, p.score_histogram,
            p.spool_frames, p.dead_letters) == ("m", 2, 9.5, 20.5, 7, [1, 2], 4, 1)
    assert pts[1].model_version == 3
    assert [p.device_id for p in store.list_series(m, m + 60000)] == ["d1", "d2"]
    assert [p.minute_ms for p in store.list_series(m, device_ids=["d1"])] == [m, m + 60000]
    assert store.list_series(m, device_ids=[]) == []
    store.add_series(store.list_series(m)[:1])  # idempotent
    store.add_series([])
    assert store.prune_series(m + 60000) == 2
    assert [(p.device_id, p.minute_ms) for p in store.list_series(0)] == [("d1", m + 60000)]
    assert pt("d1", {"time_ms": "0"}) is None  # no time: no point


def test_tokens_are_kept_hashed_revoked_and_renamed(store: Store) -> None:
    from hub.store.authrecords import TokenRecord
    t = TokenRecord("alice", "labeller", "a" * 64, 100)
    assert store.add_token(t) is True
    assert store.add_token(TokenRecord("alice", "admin", "b" * 64, 200)) is False  # an active name is taken
    assert store.get_token("alice") == t and store.find_token("a" * 64) == t and store.find_token("b" * 64) is None
    store.add_token(TokenRecord("bob", "viewer", "c" * 64, 300))
    assert [x.name for x in store.list_tokens()] == ["alice", "bob"]
    assert store.revoke_token("alice", 400) is True and store.revoke_token("alice", 500) is False
    got = store.find_token("a" * 64)
    assert got is not None and got.revoked_ms == 400 and not got.active
    assert store.revoke_token("nobody", 1) is False
    assert store.add_token(TokenRecord("alice", "operator", "d" * 64, 600)) is True  # a revoked name is reusable
    assert store.find_token("a" * 64) is None and store.get_token("alice").role == "operator"  # type: ignore


def test_sessions(store: Store) -> None:
    from hub.store.authrecords import SessionRecord
    s1, s2 = SessionRecord("h1", "alice", "csrf1", 10, 1000), SessionRecord("h2", "bob", "csrf2", 10, 5000)
    store.add_session(s1)
    store.add_session(s2)
    assert store.get_session("h1") == s1 and store.get_session("nope") is None
    assert store.prune_sessions(2000) == 1 and store.get_session("h1") is None and store.get_session("h2") == s2
    store.delete_session("h2")
    assert store.get_session("h2") is None
    store.delete_session("h2")  # idempotent


def test_models_keep_their_class_names(store: Store) -> None:
    m = ModelRecord("m", 1, "a" * 64, 100, 1, labels=["bright", "dark"])
    store.add_model(m)
    assert store.get_model("m", 1) == m and store.list_models()[0].labels == ["bright", "dark"]


def test_sqlite_frames_of_an_older_hub_get_their_top_score(tmp_path) -> None:  # noqa: ANN001
    from hub.store.query import FrameQuery
    path = tmp_path / "old-scores.db"
    s = SqliteStore(path)
    s.add_frames([qrec("o1", score=0.7), qrec("o2", score=0.2, t=1001)])
    s.close()
    db = sqlite3.connect(str(path))  # as an older hub left it: no top_score, no labelled_by, old indexes
    db.executescript("DROP INDEX frames_score_id; DROP INDEX frames_unlabelled_score_id; "
                     "ALTER TABLE frames DROP COLUMN top_score; ALTER TABLE frames DROP COLUMN labelled_by; "
                     "CREATE INDEX frames_time ON frames (capture_time_ms DESC);")
    db.close()
    s = SqliteStore(path)
    assert ids(s.query_frames(FrameQuery(order="least_confident"))) == ["o2", "o1"]
    assert ids(s.query_frames(FrameQuery(max_score=0.5))) == ["o2"]
    assert s.get_frame("o1").labelled_by == ""  # type: ignore[union-attr]
    names = {r[0] for r in s._run("i", lambda c: c.execute("SELECT name FROM sqlite_master").fetchall())}
    assert "frames_time" not in names and "frames_score_id" in names
    s.close()


def test_sqlite_label_queue_pages_read_an_index_and_never_sort(tmp_path) -> None:  # noqa: ANN001
    """The first page of each order is an index walk (no "USE TEMP B-TREE FOR ORDER BY"), the unlabelled
    queue on its partial indexes."""
    from hub.store.query import FrameQuery
    from hub.store.sqlite_web import _where
    s = SqliteStore(tmp_path / "plan.db")
    for order, sort, index in (("newest", "capture_time_ms DESC, frame_id DESC", "frames_unlabelled_time_id"),
                               ("least_confident", "top_score ASC, frame_id ASC", "frames_unlabelled_score_id")):
        for cursor in (None, "x"):
            q = FrameQuery(order=order)
            conds, params = _where(q)
            if cursor:
                conds.append("(capture_time_ms < ? OR (capture_time_ms = ? AND frame_id < ?))" if order == "newest"
                             else "(top_score > ? OR (top_score = ? AND frame_id > ?))")
                params += [1, 1, "x"]
            sql = f"EXPLAIN QUERY PLAN SELECT frame_id FROM frames WHERE {' AND '.join(conds)} ORDER BY {sort} LIMIT 49"
            plan = " ".join(str(r) for r in s._run("plan", lambda c, q=sql, p=params: c.execute(q, p).fetchall()))
            assert index in plan and "TEMP B-TREE" not in plan, plan
    s.close()


def test_mongo_frames_of_an_older_hub_get_their_top_score(mongo_store: MongoStore) -> None:
    from hub.store.query import FrameQuery
    mongo_store.add_frames([qrec("o1", score=0.7), qrec("o2", score=0.2, t=1001)])
    mongo_store.frames.update_many({}, {"$unset": {"top_score": ""}})
    again = MongoStore.from_client(mongo_store.client, database=mongo_store.db.name)  # a newer hub opens it
    assert ids(again.query_frames(FrameQuery(order="least_confident"))) == ["o2", "o1"]
    assert mongo_store.frames.count_documents({"top_score": {"$exists": False}}) == 0
