"""The MQTT ingest against a real Mosquitto and a real SQLite file."""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set

import pytest

from hub.broker import BrokerTarget, packet_limit
from hub.config import MqttSection
from hub.errors import PayloadRejected, StoreError, StoreUnavailable
from hub.ingest.batchwrite import POISON_ATTEMPTS
from hub.ingest.imagecheck import ImageRejected, check_image
from hub.ingest.message import Message
from hub.ingest.parse import DeviceUpdate, validate_frame
from hub.ingest.pipeline import Pipeline
from hub.ingest.service import Ingest
from hub.store.base import DeviceRecord, FrameRecord, GroupDesired, ModelRecord, Store
from hub.store.sqlite import SqliteStore
from proto import kestrel_pb2, topics
from tests.helpers.wait import wait_for
from tests.hub import frame_msg, frame_payload, jpeg, publish_all


class FlakyStore(Store):
    """The real SQLite store behind switches: ``down`` makes every write-path call fail with ``failure``
    (StoreUnavailable by default; a StoreError or any exception can be set), ``refuse`` makes the
    store refuse the named frame ids (StoreError) while the rest goes in."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = threading.Event()
        self.failed_calls = 0
        self.failure: Exception = StoreUnavailable("injected: store down")
        self.refuse: Set[str] = set()
        self.get_frame_failures = 0  # the next this many get_frame calls fail (StoreUnavailable)
        self.writes = 0  # store calls that write (each one transaction in SQLite)

    def _gate(self) -> None:
        if self.down.is_set():
            self.failed_calls += 1
            raise self.failure

    def _refuse(self, frames: List[FrameRecord]) -> None:
        bad = [f.frame_id for f in frames if f.frame_id in self.refuse]
        if bad:
            raise StoreError(f"injected: document for {bad[0]} refused")

    def add_frame(self, frame: FrameRecord) -> bool:
        self._gate()
        self._refuse([frame])
        self.writes += 1
        return self.inner.add_frame(frame)

    def apply_batch(self, frames: List[FrameRecord], devices: Dict[str, Dict[str, object]],
                    seen: Dict[str, int], points: Sequence[Any] = ()) -> List[Optional[str]]:
        self._gate()
        self._refuse(frames)
        self.writes += 1
        return self.inner.apply_batch(frames, devices, seen, points)

    def touch_devices(self, seen: Dict[str, int]) -> None:
        self._gate()
        self.writes += 1
        self.inner.touch_devices(seen)

    def get_frame(self, frame_id: str) -> Optional[FrameRecord]:
        if self.get_frame_failures > 0:
            self.get_frame_failures -= 1
            raise StoreUnavailable("injected: get_frame failed")
        return self.inner.get_frame(frame_id)

    def list_frames(self, *a: Any, **k: Any) -> List[FrameRecord]:
        return self.inner.list_frames(*a, **k)

    def count_frames(self, device_id: Optional[str] = None) -> int:
        return self.inner.count_frames(device_id)

    def set_labels(self, labels: Dict[str, Optional[str]], when_ms: int, by: str = "") -> Dict[str, Optional[str]]:
        return self.inner.set_labels(labels, when_ms, by)

    # the dashboard's queries, series, tokens and sessions: passed through untouched
    def query_frames(self, query: Any) -> Any:
        return self.inner.query_frames(query)

    def count_unlabelled(self) -> int:
        return self.inner.count_unlabelled()

    def add_series(self, points: Sequence[Any]) -> None:
        self.inner.add_series(points)

    def list_series(self, since_ms: int, until_ms: Optional[int] = None, device_ids: Any = None) -> List[Any]:
        return self.inner.list_series(since_ms, until_ms, device_ids)

    def prune_series(self, before_ms: int) -> int:
        return self.inner.prune_series(before_ms)

    def add_token(self, token: Any) -> bool:
        return self.inner.add_token(token)

    def get_token(self, name: str) -> Any:
        return self.inner.get_token(name)

    def find_token(self, token_hash: str) -> Any:
        return self.inner.find_token(token_hash)

    def list_tokens(self) -> List[Any]:
        return self.inner.list_tokens()

    def revoke_token(self, name: str, when_ms: int) -> bool:
        return self.inner.revoke_token(name, when_ms)

    def add_session(self, session: Any) -> None:
        self.inner.add_session(session)

    def get_session(self, id_hash: str) -> Any:
        return self.inner.get_session(id_hash)

    def delete_session(self, id_hash: str) -> None:
        self.inner.delete_session(id_hash)

    def prune_sessions(self, now_ms: int) -> int:
        return self.inner.prune_sessions(now_ms)

    def iter_labelled(self) -> Iterator[FrameRecord]:
        return self.inner.iter_labelled()

    def put_blob(self, sha256: str, src: Any, size: int) -> None:
        self.inner.put_blob(sha256, src, size)

    def open_blob(self, sha256: str) -> Any:
        return self.inner.open_blob(sha256)

    def has_blob(self, sha256: str) -> bool:
        return self.inner.has_blob(sha256)

    def delete_blob(self, sha256: str) -> bool:
        return self.inner.delete_blob(sha256)

    def upsert_device(self, device_id: str, **fields: object) -> DeviceRecord:
        self._gate()
        self.writes += 1
        return self.inner.upsert_device(device_id, **fields)

    def get_device(self, device_id: str) -> Optional[DeviceRecord]:
        self._gate()
        return self.inner.get_device(device_id)

    def list_devices(self, group: Optional[str] = None) -> List[DeviceRecord]:
        return self.inner.list_devices(group)

    def set_group_desired(self, group: str, model_name: str, version: int, rollback: bool,
                          issued_ms: int) -> GroupDesired:
        return self.inner.set_group_desired(group, model_name, version, rollback, issued_ms)

    def get_group_desired(self, group: str) -> Optional[GroupDesired]:
        return self.inner.get_group_desired(group)

    def add_model(self, model: ModelRecord) -> bool:
        return self.inner.add_model(model)

    def get_model(self, model_name: str, version: int) -> Optional[ModelRecord]:
        return self.inner.get_model(model_name, version)

    def list_models(self, model_name: Optional[str] = None) -> List[ModelRecord]:
        return self.inner.list_models(model_name)

    def ping(self) -> None:
        self._gate()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "hub.db")
    yield s
    s.close()


@pytest.fixture
def group() -> str:
    """A share group of its own per test: persistent sessions of earlier tests never take our frames."""
    return f"t{uuid.uuid4().hex[:10]}"


def frame_acks(ing: Ingest) -> int:
    """Acknowledgements minus those of status messages: retained statuses that other tests left on the
    session broker are delivered to every new subscriber (and acknowledged) too."""
    h = ing.health()
    return int(h["acked"]) - int(h["status"])


class RecordedAcks:
    """The pipeline's Acknowledger without a broker: records what it was handed back."""

    def __init__(self) -> None:
        self.acked: List[Message] = []

    def ack(self, msgs: List[Message]) -> int:
        self.acked.extend(msgs)
        return len(msgs)


def make_pipeline(store: Store, tmp_path: Path, **mqtt: Any) -> Pipeline:
    """The batch pipeline alone (not started): tests hand it batches on their own thread."""
    return Pipeline(store, MqttSection(**mqtt), tmp_path / "dead", RecordedAcks())


def make_ingest(broker: Any, store: Store, group: str, client_id: str = "", dead_letter: Optional[Path] = None,
                **mqtt: Any) -> Ingest:
    cfg = MqttSection(share_group=group, retry_initial_s=0.05, retry_max_s=0.3, **mqtt)
    ing = Ingest(store, BrokerTarget(broker.host, broker.port), cfg,
                 client_id or f"hub-{uuid.uuid4().hex[:8]}",
                 dead_letter_dir=dead_letter or Path(tempfile.mkdtemp(prefix="kestrel-dead-letter-")))
    ing.start()
    assert ing.wait_subscribed(10), "ingest did not subscribe"
    return ing


def test_valid_frames_are_stored_with_their_fields(broker: Any, store: SqliteStore, group: str) -> None:
    ing = make_ingest(broker, store, group)
    try:
        publish_all(broker.host, broker.port,
                    [(topics.frames("cam-7"), frame_payload(f"cam-7-{i}", "cam-7", seq=i)) for i in range(5)])
        wait_for(lambda: store.count_frames() == 5, 10, what="5 frames stored")
        got = store.get_frame("cam-7-3")
        assert got is not None
        want = frame_msg("cam-7-3", "cam-7", seq=3)
        assert (got.device_id, got.capture_time_ms, got.model_name, got.model_version, got.model_sha256) == \
               ("cam-7", want.capture_time_ms, "brightness", 3, "ab" * 32)
        assert got.reasons == ["LOW_CONFIDENCE"]
        assert got.top_k[0]["label"] == "dark" and got.top_k[0]["score"] == pytest.approx(0.41)
        assert got.image == jpeg(3) and (got.width, got.height) == (64, 48)
        assert (got.source, got.sequence, got.label) == ("cam0", 3, None)
        assert got.received_ms > 0
        dev = store.get_device("cam-7")
        assert dev is not None and dev.last_seen_ms > 0  # auto-registered
        wait_for(lambda: frame_acks(ing) == 5, 5, what="5 acks")
        assert ing.health()["stored"] == 5
    finally:
        ing.stop()


def test_bad_payloads_are_rejected_per_reason_and_ingest_goes_on(broker: Any, store: SqliteStore,
                                                                 group: str) -> None:
    ing = make_ingest(broker, store, group, max_payload_bytes=8192)
    try:
        big = frame_payload("big", "cam-1", image=jpeg(1, w=120, h=90, quality=100))
        assert 8192 < len(big) < packet_limit(8192) - 1024
        huge = frame_payload("huge", "cam-1", image=jpeg(1, w=400, h=300, quality=100))
        assert len(huge) > packet_limit(8192)
        no_id = frame_msg("x", "cam-1")
        no_id.frame_id = ""
        bad = [
            (topics.frames("cam-1"), b"\xff\xff\xff not protobuf"),                      # bad_protobuf
            (topics.frames("cam-1"), huge),  # over the hub's MQTT 5 Maximum Packet Size: never sent to it
            (topics.frames("cam-1"), big),                                                # too_large
            (topics.frames("cam-2"), frame_payload("mismatch", "cam-1")),                 # device_mismatch
            (topics.frames("cam-1"), frame_payload("garbage-img", "cam-1", image=b"\x00" * 500)),  # bad_image
            (topics.frames("cam-1"), no_id.SerializeToString()),                          # missing_frame_id
        ]
        good = [(topics.frames("cam-1"), frame_payload(f"ok-{i}", "cam-1", seq=i)) for i in range(3)]
        publish_all(broker.host, broker.port, bad[:3] + good[:1] + bad[3:] + good[1:])
        wait_for(lambda: store.count_frames() == 3, 10, what="the 3 good frames")
        h = wait_for(lambda: (lambda h: h if frame_acks(ing) == 8 else None)(ing.health()), 10, what="8 acks")
        assert h["received"] - h["status"] == 8  # the huge one never reached the hub
        rej = h["rejected"]
        assert {k: v for k, v in rej.items() if v} == {
            "bad_protobuf": 1, "too_large": 1, "device_mismatch": 1, "bad_image": 1, "missing_frame_id": 1}
        assert sorted(f.frame_id for f in store.list_frames()) == ["ok-0", "ok-1", "ok-2"]
    finally:
        ing.stop()


def test_frame_resent_by_the_device_is_stored_once(broker: Any, store: SqliteStore, group: str) -> None:
    """A device re-sending from its spool (new PUBLISH, same frame_id): one record, counted as duplicate."""
    ing = make_ingest(broker, store, group)
    try:
        p = frame_payload("dup-1", "cam-1")
        publish_all(broker.host, broker.port, [(topics.frames("cam-1"), p)] * 3 +
                    [(topics.frames("cam-1"), frame_payload("dup-2", "cam-1"))])
        wait_for(lambda: frame_acks(ing) == 4, 10, what="4 acks")
        assert store.count_frames() == 2
        assert ing.health()["duplicates"] == 2
    finally:
        ing.stop()


def test_qos1_redelivery_after_lost_acks_is_deduplicated(broker: Any, store: SqliteStore, group: str) -> None:
    """A real broker redelivery: the hub commits but its PUBACKs never leave (as if it died right after
    the commit); the broker resends the unacknowledged messages to the next session with the same
    client id. They count as duplicates and make no second record."""
    cid = f"hub-{uuid.uuid4().hex[:8]}"
    ing = make_ingest(broker, store, group, client_id=cid)
    suppressed: List[int] = []
    ing.link.ack = lambda msgs: (suppressed.extend(m.mid for m in msgs), len(msgs))[1]  # type: ignore[method-assign]
    publish_all(broker.host, broker.port,
                [(topics.frames("cam-1"), frame_payload(f"r{i}", "cam-1", seq=i)) for i in range(6)])
    wait_for(lambda: ing.health()["stored"] == 6, 10, what="6 frames committed")
    assert len(suppressed) >= 6 and store.count_frames() == 6
    ing.stop()
    ing2 = make_ingest(broker, store, group, client_id=cid)
    try:
        h = wait_for(lambda: (lambda h: h if h["duplicates"] >= 6 else None)(ing2.health()), 10,
                     what="the broker's redeliveries")
        assert h["duplicates"] == 6 and h["stored"] == 0
        assert store.count_frames() == 6
        wait_for(lambda: frame_acks(ing2) >= 6, 5, what="redeliveries acknowledged this time")
    finally:
        ing2.stop()


def test_a_batch_of_acks_reaches_the_broker(broker_factory: Any, store: SqliteStore, group: str) -> None:
    """The QoS 1 acks of a batch leave as one write of back-to-back PUBACKs: the broker takes every one
    (nothing is resent to the next session with the same client id). A private broker: on the shared
    one, last wills of earlier tests' devices are acknowledged in the same writes."""
    broker = broker_factory()
    cid = f"hub-{uuid.uuid4().hex[:8]}"
    ing = make_ingest(broker, store, group, client_id=cid)
    assert ing.link.hooks["batched_puback"], "paho's packet queue is not taken: see tests/hub/test_pahohooks.py"
    publish_all(broker.host, broker.port,
                [(topics.frames("cam-1"), frame_payload(f"k{i}", "cam-1", seq=i)) for i in range(30)])
    wait_for(lambda: frame_acks(ing) == 30, 10, what="30 acks")
    link = ing.link
    assert link.acks_batched + link.acks_single == 30 and link.ack_writes < 30  # fewer writes than frames
    ing.stop()
    ing2 = make_ingest(broker, store, group, client_id=cid)
    try:
        publish_all(broker.host, broker.port, [(topics.frames("cam-1"), frame_payload("k-last", "cam-1", seq=99))])
        wait_for(lambda: ing2.health()["stored"] == 1, 10, what="the next frame")
        assert ing2.health()["duplicates"] == 0 and store.count_frames() == 31  # no redelivery
    finally:
        ing2.stop()


def test_unknown_devices_rejected_when_not_allowed(broker_factory: Any, store: SqliteStore, group: str) -> None:
    # a private broker: retained statuses of unknown devices left by other tests would be rejected too
    broker = broker_factory()
    store.upsert_device("known")
    ing = make_ingest(broker, store, group, allow_unknown_devices=False)
    try:
        publish_all(broker.host, broker.port, [(topics.frames("stranger"), frame_payload("s1", "stranger")),
                                               (topics.frames("known"), frame_payload("k1", "known"))])
        wait_for(lambda: frame_acks(ing) == 2, 10, what="2 acks")
        assert [f.frame_id for f in store.list_frames()] == ["k1"]
        assert ing.health()["rejected"]["unknown_device"] == 1
        assert store.get_device("stranger") is None
    finally:
        ing.stop()


def test_refused_unknown_devices_are_not_looked_up_for_every_message(
        store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hub.ingest.devices
    flaky = FlakyStore(store)
    lookups: List[str] = []
    real = flaky.get_device
    monkeypatch.setattr(flaky, "get_device", lambda d: (lookups.append(d), real(d))[1])
    pl = make_pipeline(flaky, tmp_path, validate_workers=1, allow_unknown_devices=False)
    clock = [1000.0]
    monkeypatch.setattr(hub.ingest.devices.time, "monotonic", lambda: clock[0])
    for i in range(3):
        batch = [Message(0, 0, topics.frames("stranger"), frame_payload(f"x{i}{j}", "stranger", seq=j), 0, 1)
                 for j in range(4)]
        pl._process_with_retry(batch, pl._validate_batch(batch))
    assert lookups == ["stranger"] and pl.snapshot()["rejected"]["unknown_device"] == 12
    store.upsert_device("stranger")  # registered meanwhile: accepted once the refusal expires
    clock[0] += hub.ingest.devices.UNKNOWN_DEVICE_CACHE_S
    batch = [Message(0, 0, topics.frames("stranger"), frame_payload("late", "stranger"), 0, 1)]
    pl._process_with_retry(batch, pl._validate_batch(batch))
    assert lookups == ["stranger", "stranger"] and store.count_frames() == 1


def test_require_enrolled_accepts_only_enrolled_unrevoked_devices(
        store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hub.ingest.devices
    store.upsert_device("seen-only")  # auto-registered once, never enrolled
    store.upsert_device("enrolled", enrolled_ms=1, enrolled_group="g")
    store.upsert_device("revoked", enrolled_ms=1, enrolled_group="g", revoked_ms=2)
    pl = make_pipeline(store, tmp_path, validate_workers=1, require_enrolled=True)
    clock = [1000.0]
    monkeypatch.setattr(hub.ingest.devices.time, "monotonic", lambda: clock[0])
    names = ("seen-only", "enrolled", "revoked", "stranger")
    batch = [Message(0, 0, topics.frames(d), frame_payload(f"f-{d}", d), 0, 1) for d in names]
    status = kestrel_pb2.Status(device_id="stranger", state="online", group="evil")
    batch.append(Message(0, 0, topics.status("stranger"), status.SerializeToString(), 0, 1))
    validated = pl._validate_batch(batch)
    # no image of a device the commit has not admitted yet is written ahead
    assert [d for d in names if pl._devices.stage_ahead(d)] == []
    pl._process_with_retry(batch, validated)
    assert [f.frame_id for f in store.list_frames()] == ["f-enrolled"]
    assert pl.snapshot()["rejected"]["unknown_device"] == 4 and store.get_device("stranger") is None
    assert pl._devices.stage_ahead("enrolled") and not pl._devices.stage_ahead("seen-only")
    store.upsert_device("enrolled", revoked_ms=3)  # revoked while the hub runs: refused after the cache time
    clock[0] += hub.ingest.devices.UNKNOWN_DEVICE_CACHE_S
    batch = [Message(0, 0, topics.frames("enrolled"), frame_payload("after", "enrolled"), 0, 1)]
    pl._process_with_retry(batch, pl._validate_batch(batch))
    assert store.get_frame("after") is None and pl.snapshot()["rejected"]["unknown_device"] == 5


def test_status_and_telemetry_update_the_device(broker: Any, store: SqliteStore, group: str) -> None:
    dev = f"cam-{uuid.uuid4().hex[:6]}"
    status = kestrel_pb2.Status(
        device_id=dev, state="online", time_ms=1234, group="lab", confidence_threshold=0.71,
        model=kestrel_pb2.ModelRef(name="m", version=5, sha256="ee" * 32),
        versions=kestrel_pb2.VersionManifest(installed=kestrel_pb2.ModelRef(name="m", version=5,
                                                                            sha256="ee" * 32),
                                             previous=kestrel_pb2.ModelRef(name="m", version=4),
                                             update_state="COMMITTED", reason=""))
    # retained before the hub starts: the hub learns it on subscribe
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(topics.status(dev), status.SerializeToString(), qos=1, retain=True).wait_for_publish(5)
    ing = make_ingest(broker, store, group)
    try:
        d = wait_for(lambda: store.get_device(dev), 10, what="device from the retained status")
        got = (d.state, d.group, d.reported_model, d.reported_version, d.previous_version, d.update_state,
               d.threshold)
        assert got == ("online", "lab", "m", 5, 4, "COMMITTED", 0.71)  # 0.71, not float32's 0.7099999
        tele = kestrel_pb2.Telemetry(device_id=dev, time_ms=5678, fps=12.5, queue_depth=3)
        c.publish(topics.telemetry(dev), tele.SerializeToString(), qos=0).wait_for_publish(5)
        d = wait_for(lambda: (lambda x: x if x and x.last_telemetry else None)(store.get_device(dev)), 10,
                     what="telemetry applied")
        assert d.last_telemetry["fps"] == 12.5 and d.last_telemetry["queue_depth"] == 3
        offline = kestrel_pb2.Status(device_id=dev, state="offline", time_ms=9999)
        c.publish(topics.status(dev), offline.SerializeToString(), qos=1, retain=True).wait_for_publish(5)
        d = wait_for(lambda: (lambda x: x if x and x.state == "offline" else None)(store.get_device(dev)), 10,
                     what="offline status")
        assert d.reported_version == 5  # an offline status without versions keeps what we knew
        assert d.threshold == 0.71
    finally:
        c.publish(topics.status(dev), b"", qos=1, retain=True).wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
        ing.stop()


def test_store_unavailable_pauses_without_ack_then_resumes(broker: Any, store: SqliteStore,
                                                           group: str) -> None:
    flaky = FlakyStore(store)
    flaky.down.set()
    ing = make_ingest(broker, flaky, group)
    try:
        publish_all(broker.host, broker.port,
                    [(topics.frames("cam-1"), frame_payload(f"p{i}", "cam-1", seq=i)) for i in range(10)])
        wait_for(lambda: ing.health()["paused"] and flaky.failed_calls >= 3, 10, what="paused, retrying")
        h = ing.health()
        assert h["acked"] == 0 and h["stored"] == 0 and store.count_frames() == 0
        flaky.down.clear()
        wait_for(lambda: store.count_frames() == 10, 10, what="all 10 stored after the store came back")
        wait_for(lambda: frame_acks(ing) == 10, 5, what="10 acks")
        assert ing.health()["paused"] is False
    finally:
        ing.stop()


def test_unacked_frames_survive_a_hub_that_gives_up(broker: Any, store: SqliteStore, group: str) -> None:
    """Store down, hub stops without acking: the broker keeps the frames for the session; a new hub
    process with the same client id stores every one."""
    flaky = FlakyStore(store)
    flaky.down.set()
    cid = f"hub-{uuid.uuid4().hex[:8]}"
    ing = make_ingest(broker, flaky, group, client_id=cid)
    publish_all(broker.host, broker.port,
                [(topics.frames("cam-1"), frame_payload(f"q{i}", "cam-1", seq=i)) for i in range(20)])
    wait_for(lambda: ing.health()["paused"], 10, what="paused")
    ing.stop()
    assert store.count_frames() == 0
    ing2 = make_ingest(broker, store, group, client_id=cid)
    try:
        wait_for(lambda: store.count_frames() == 20, 15, what="all 20 redelivered and stored")
    finally:
        ing2.stop()


def _png(seed: int, w: int = 40, h: int = 30) -> bytes:
    import cv2
    import numpy as np
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return bytes(cv2.imencode(".png", img)[1].tobytes())


def test_check_image_decodes_the_whole_image():
    """The cheap (1/8-scale) JPEG decode still reads every entropy-coded block: truncation anywhere in
    the scan is refused, as are garbage and header-only images; PNG is checked by a full decode."""
    good = jpeg(5, w=160, h=120)
    assert check_image(good, "jpeg") == (160, 120)
    assert check_image(_png(1), "png") == (40, 30)
    bad = [good[:len(good) // 2], good[:int(len(good) * 0.9)], good[:-2], good[:400],
           b"\xff\xd8" + bytes(2000), b"\x00" * 500, _png(2)[:200], _png(3)[:-20]]
    for data in bad:
        with pytest.raises(ImageRejected):
            check_image(data, "jpeg")
    frame = kestrel_pb2.Frame.FromString(frame_payload("v1", "cam-1"))
    frame.image = bad[0]
    with pytest.raises(PayloadRejected) as info:  # what the ingest counts
        validate_frame("cam-1", frame.SerializeToString(), 1 << 20, 0)
    assert info.value.reason == "bad_image"


def test_parallel_validation_keeps_the_batch_order(tmp_path: Path):
    """Frames are validated in per-worker chunks; each result must stay with its message."""
    store = SqliteStore(tmp_path / "v.db")
    pl = make_pipeline(store, tmp_path, validate_workers=3)
    try:
        batch = []
        for i in range(11):
            payload = frame_payload(f"f{i}", "cam-1", image=b"junk" if i % 4 == 1 else None, seq=i)
            batch.append(Message(i, 1, topics.frames("cam-1"), payload, 0, 0))
        batch.append(Message(99, 1, topics.telemetry("cam-1"), b"", 0, 0))
        results = pl._validate_batch(batch)
        assert len(results) == len(batch)
        for i, r in enumerate(results[:11]):
            if i % 4 == 1:
                assert isinstance(r, PayloadRejected) and r.reason == "bad_image"
            else:
                assert isinstance(r, FrameRecord) and r.frame_id == f"f{i}" and r.sequence == i
                assert r.reasons == ["LOW_CONFIDENCE"]
        tele = results[11]  # parsed on the validate stage too (an empty Telemetry is a valid one)
        assert isinstance(tele, DeviceUpdate) and (tele.kind, tele.fields) == ("telemetry", {"last_telemetry": {}})
    finally:
        pl.stop()
        store.close()


def test_store_error_pauses_without_ack_and_the_commit_thread_survives(broker: Any, store: SqliteStore,
                                                                        group: str) -> None:
    """Not only StoreUnavailable: a StoreError on a device write, or an unexpected exception, pauses
    the ingest (healthz 503), acknowledges nothing, and the thread retries until the store works."""
    flaky = FlakyStore(store)
    ing = make_ingest(broker, flaky, group)
    try:
        _pause_then_resume(broker, store, flaky, ing, StoreError("injected: auth failed"))
        _pause_then_resume(broker, store, flaky, ing, RuntimeError("injected: a bug"))
    finally:
        ing.stop()


def _pause_then_resume(broker: Any, store: Store, flaky: FlakyStore, ing: Ingest, failure: Exception) -> None:
    flaky.failure = failure
    flaky.down.set()
    before = ing.health()
    n = int(before["stored"])
    publish_all(broker.host, broker.port,
                [(topics.frames("cam-1"), frame_payload(f"e{n + i}", "cam-1", seq=i)) for i in range(5)])
    h = wait_for(lambda: (lambda h: h if h["paused"] and h["store_retries"] >= before["store_retries"] + 2
                          else None)(ing.health()), 10, what="paused, retrying")
    assert h["threads_alive"] and str(failure) in h["last_store_error"]
    assert frame_acks(ing) == frame_acks_of(before) and store.count_frames() == n
    flaky.down.clear()
    wait_for(lambda: store.count_frames() == n + 5, 10, what="stored once the store works")
    wait_for(lambda: frame_acks(ing) == frame_acks_of(before) + 5, 5, what="acks after the commit")
    h = ing.health()
    assert h["paused"] is False and h["duplicates"] == 0 and h["rejected"]["store_error"] == 0


def frame_acks_of(h: Dict[str, Any]) -> int:
    return int(h["acked"]) - int(h["status"])


def test_a_frame_the_store_refuses_is_dead_lettered_not_counted_as_duplicate(
        broker: Any, store: SqliteStore, group: str, tmp_path: Path) -> None:
    """The store refuses one record while the others of the batch go in: that one is clearly the
    problem. Its payload is kept in the dead-letter folder, it is counted as store_error (not as a
    duplicate), and the batch is acknowledged."""
    flaky = FlakyStore(store)
    flaky.refuse = {"bad-1"}
    dead = tmp_path / "dead"
    ing = make_ingest(broker, flaky, group, dead_letter=dead)
    try:
        bad = frame_payload("bad-1", "cam-1", seq=1)
        items = [(topics.frames("cam-1"), frame_payload(f"ok{i}", "cam-1", seq=i)) for i in range(4)]
        publish_all(broker.host, broker.port, items[:2] + [(topics.frames("cam-1"), bad)] + items[2:])
        wait_for(lambda: frame_acks(ing) == 5, 10, what="all 5 acknowledged")
        h = ing.health()
        assert store.count_frames() == 4 and store.get_frame("bad-1") is None
        assert h["rejected"]["store_error"] == 1 and h["duplicates"] == 0 and h["dead_lettered"] == 1
        kept = sorted(dead.glob("*.frame"))
        assert len(kept) == 1 and kept[0].read_bytes() == bad
        meta = json.loads(kept[0].with_suffix(".json").read_text())
        assert meta["reason"] == "store_error" and "bad-1" in meta["detail"]
    finally:
        ing.stop()


def test_a_lone_refused_frame_is_given_up_only_after_a_probe_write_succeeds(
        broker: Any, store: SqliteStore, group: str, tmp_path: Path) -> None:
    """Every frame of the batch refused: maybe the store is broken as a whole, so it is retried
    POISON_ATTEMPTS times; then a probe write tells: it succeeds, so the frame goes to the dead letters."""
    flaky = FlakyStore(store)
    flaky.refuse = {"lone"}
    ing = make_ingest(broker, flaky, group, dead_letter=tmp_path / "dead")
    try:
        publish_all(broker.host, broker.port, [(topics.frames("cam-1"), frame_payload("lone", "cam-1"))])
        wait_for(lambda: frame_acks(ing) == 1, 10, what="the lone frame acknowledged")
        h = ing.health()
        assert h["store_retries"] == POISON_ATTEMPTS - 1 and h["rejected"]["store_error"] == 1
        assert len(list((tmp_path / "dead").glob("*.frame"))) == 1 and store.count_frames() == 0
    finally:
        ing.stop()


def test_a_frame_id_of_another_device_is_a_conflict_not_a_duplicate(
        broker: Any, store: SqliteStore, group: str, tmp_path: Path) -> None:
    """Frame ids are predictable ({device}-{boot}-{seq}): a frame from cam-2 reusing cam-1's id must
    not pass as a redelivery of cam-1's frame."""
    ing = make_ingest(broker, store, group, dead_letter=tmp_path / "dead")
    try:
        publish_all(broker.host, broker.port, [(topics.frames("cam-1"), frame_payload("cam-1-0-1", "cam-1"))])
        wait_for(lambda: store.count_frames() == 1, 10, what="cam-1's frame")
        forged = frame_payload("cam-1-0-1", "cam-2", seq=9)
        publish_all(broker.host, broker.port, [(topics.frames("cam-2"), forged)])
        h = wait_for(lambda: (lambda h: h if h["rejected"]["frame_id_conflict"] else None)(ing.health()), 10,
                     what="conflict counted")
        assert h["duplicates"] == 0 and h["dead_lettered"] == 1
        got = store.get_frame("cam-1-0-1")
        assert got is not None and got.device_id == "cam-1" and got.sequence == 0
        assert [p.read_bytes() for p in (tmp_path / "dead").glob("*.frame")] == [forged]
    finally:
        ing.stop()


def test_a_forged_frame_id_stays_a_conflict_when_the_store_fails_midway(
        broker: Any, store: SqliteStore, group: str, tmp_path: Path) -> None:
    """The ownership of an existing frame_id is decided from the same store call that found it exists:
    a store failure between the two (a retried batch) must not let a forged id pass as a duplicate."""
    flaky = FlakyStore(store)
    ing = make_ingest(broker, flaky, group, dead_letter=tmp_path / "dead")
    try:
        publish_all(broker.host, broker.port, [(topics.frames("cam-1"), frame_payload("cam-1-0-7", "cam-1"))])
        wait_for(lambda: frame_acks(ing) == 1, 10, what="cam-1's frame")
        flaky.get_frame_failures = 1
        publish_all(broker.host, broker.port, [(topics.frames("cam-2"), frame_payload("cam-1-0-7", "cam-2"))])
        wait_for(lambda: frame_acks(ing) == 2, 10, what="the forged frame acknowledged")
        h = ing.health()
        assert h["rejected"]["frame_id_conflict"] == 1 and h["duplicates"] == 0 and h["dead_lettered"] == 1
        assert store.get_frame("cam-1-0-7").device_id == "cam-1"  # type: ignore[union-attr]
    finally:
        ing.stop()


def test_dead_letters_of_one_millisecond_never_overwrite_each_other(
        store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QoS 0 messages all have mid 0: two refused in the same millisecond must give two dead letters."""
    import hub.ingest.pipeline
    monkeypatch.setattr(hub.ingest.pipeline, "now_ms", lambda: 1_700_000_000_000)
    flaky = FlakyStore(store)
    flaky.refuse = {"r1", "r2"}
    pl = make_pipeline(flaky, tmp_path, validate_workers=1)
    try:
        batch = [Message(0, 0, topics.frames("cam-1"), frame_payload(fid, "cam-1", seq=i), 0, 1)
                 for i, fid in enumerate(["r1", "ok", "r2"])]
        pl._process_with_retry(batch, pl._validate_batch(batch))
        kept = sorted(p.read_bytes() for p in (tmp_path / "dead").glob("*.frame"))
        assert kept == sorted([batch[0].payload, batch[2].payload])
        assert pl.snapshot()["dead_lettered"] == 2 and store.count_frames() == 1
    finally:
        store.close()


def test_a_batch_is_one_store_transaction_with_device_updates_merged(store: SqliteStore, tmp_path: Path) -> None:
    """20 frames + 50 telemetry + 2 statuses: one store write (one COMMIT, one fsync with FULL), each
    device upserted once with its messages merged in arrival order (the last status wins)."""
    flaky = FlakyStore(store)
    pl = make_pipeline(flaky, tmp_path, validate_workers=1)
    batch = [Message(0, 0, topics.frames(f"cam-{i % 4}"), frame_payload(f"tx{i}", f"cam-{i % 4}", seq=i), 0,
                     1000 + i) for i in range(20)]
    tele = [kestrel_pb2.Telemetry(device_id=f"cam-{i % 5}", time_ms=500 + i, fps=float(i)) for i in range(50)]
    batch += [Message(0, 0, topics.telemetry(t.device_id), t.SerializeToString(), 0, 2000 + i)
              for i, t in enumerate(tele)]
    batch += [Message(0, 0, topics.status("cam-1"), kestrel_pb2.Status(device_id="cam-1", state=st, time_ms=t)
                      .SerializeToString(), 0, 3000) for st, t in (("online", 600), ("offline", 700))]
    statements: List[str] = []
    store._conn().set_trace_callback(statements.append)
    try:
        pl._process_with_retry(batch, pl._validate_batch(batch))
        assert flaky.writes == 1 and statements.count("COMMIT") == 1
        assert store.count_frames() == 20 and pl.snapshot()["stored"] == 20
        assert [d.device_id for d in store.list_devices()] == [f"cam-{i}" for i in range(5)]
        cam1, cam4 = store.get_device("cam-1"), store.get_device("cam-4")
        assert cam1 is not None and cam1.state == "offline" and cam1.last_telemetry["fps"] == 46.0
        assert cam4 is not None and cam4.last_telemetry["fps"] == 49.0 and cam4.last_seen_ms == 549
        assert cam1.last_seen_ms == 1017  # its last frame's arrival (later than its messages' own times)
        assert pl.acknowledger.acked == batch  # type: ignore[attr-defined]  # handed back to acknowledge, in order
    finally:
        store.close()


def test_last_seen_never_goes_backwards_or_into_the_future(broker_factory: Any, store: SqliteStore,
                                                           group: str) -> None:
    """The device's offline last-will carries the time it connected: it must not pull last_seen back.
    A clock running ahead must not push it into the future either."""
    broker = broker_factory()
    ing = make_ingest(broker, store, group)
    try:
        now = int(time.time() * 1000)
        online = kestrel_pb2.Status(device_id="cam-5", state="online", time_ms=now - 1000)
        publish_all(broker.host, broker.port, [(topics.status("cam-5"), online.SerializeToString())])
        d = wait_for(lambda: store.get_device("cam-5"), 10, what="cam-5 registered")
        publish_all(broker.host, broker.port, [(topics.frames("cam-5"), frame_payload("s1", "cam-5"))])
        wait_for(lambda: store.count_frames() == 1, 10, what="frame")
        ahead = kestrel_pb2.Telemetry(device_id="cam-5", time_ms=now + 3_600_000)
        publish_all(broker.host, broker.port, [(topics.telemetry("cam-5"), ahead.SerializeToString())], qos=0)
        d = wait_for(lambda: (lambda d: d if d and d.last_telemetry else None)(store.get_device("cam-5")), 10,
                     what="telemetry")
        after_frame = d.last_seen_ms
        assert now <= after_frame <= int(time.time() * 1000)  # received time, not the clock ahead
        will = kestrel_pb2.Status(device_id="cam-5", state="offline", time_ms=now - 60_000)
        publish_all(broker.host, broker.port, [(topics.status("cam-5"), will.SerializeToString())])
        d = wait_for(lambda: (lambda d: d if d and d.state == "offline" else None)(store.get_device("cam-5")), 10,
                     what="offline")
        assert d.last_seen_ms == after_frame
    finally:
        ing.stop()


def test_qos0_backlog_is_bounded_and_counted(tmp_path: Path) -> None:
    """While the commit thread waits for the store, telemetry (QoS 0, no broker window) must not grow
    the in-memory queue without bound: past queue_max_qos0 it is dropped and counted. QoS 1 is kept."""
    store = SqliteStore(tmp_path / "q.db")
    ing = Ingest(store, BrokerTarget("127.0.0.1", 1), MqttSection(queue_max_qos0=5), "qos0-bound",
                 dead_letter_dir=tmp_path / "dead")
    try:
        class Msg:
            def __init__(self, mid: int, qos: int, topic: str) -> None:
                self.mid, self.qos, self.topic, self.payload = mid, qos, topic, b"x"

        for i in range(12):  # not started: nothing drains the queue
            ing.link._on_message(ing.client, None, Msg(i, 0, topics.telemetry("cam-1")))  # type: ignore[arg-type]
        ing.link._on_message(ing.client, None, Msg(99, 1, topics.frames("cam-1")))  # type: ignore[arg-type]
        assert ing.pipeline.backlog() == 6 and ing.health()["dropped_qos0"] == 7
        assert ing.health()["threads_alive"] is False  # not started: /healthz would say so
    finally:
        store.close()


def test_status_threshold_is_taken_from_online_statuses_only() -> None:
    """The threshold a device runs comes from its online statuses; an older device's (no field) and an offline
    one (maybe the last will it left at connect time, before a model swap changed it) leave the record alone."""
    from hub.ingest.parse import status_fields

    online = kestrel_pb2.Status(device_id="d", state="online", confidence_threshold=0.64)
    assert status_fields(online)["threshold"] == 0.64
    assert "threshold" not in status_fields(kestrel_pb2.Status(device_id="d", state="online"))
    will = kestrel_pb2.Status(device_id="d", state="offline", confidence_threshold=0.6)
    assert "threshold" not in status_fields(will)
    assert status_fields(kestrel_pb2.Status(device_id="d", state="online", confidence_threshold=0.0))["threshold"] == 0
