"""The hub's storage receipts and its session: what the ingest tells devices after a commit, the retained
announcement, and a lost session noticed with a resend request (real Mosquitto, real SQLite)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Dict, List

from hub.broker import BrokerTarget
from hub.config import MqttSection
from hub.ingest.mqttlink import MqttLink
from hub.store.sqlite import SqliteStore
from proto import kestrel_pb2, topics
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for
from tests.hub import frame_payload, publish_all
from tests.hub.test_ingest import make_ingest


def receipts_of(col: Collector, device: str) -> List[kestrel_pb2.Receipt]:
    return [kestrel_pb2.Receipt.FromString(p) for p in col.payloads(f"/{device}/receipts")]


def test_each_commit_receipts_durable_frames_and_names_the_refused(broker_factory: Any, tmp_path: Path) -> None:
    b = broker_factory()
    store = SqliteStore(tmp_path / "hub.db")
    col = Collector(b.host, b.port, [topics.receipts("cam-1"), topics.receipts("cam-2"), topics.HUB_ANNOUNCE])
    ing = make_ingest(b, store, f"g{uuid.uuid4().hex[:8]}", client_id="hub-rc", dead_letter=tmp_path / "dead")
    try:
        wait_for(lambda: col.payloads(topics.HUB_ANNOUNCE), 10, what="the retained announcement")
        ann = kestrel_pb2.HubAnnouncement.FromString(col.payloads(topics.HUB_ANNOUNCE)[-1])
        assert ann.receipts and ann.hub_id == "hub-rc"
        publish_all(b.host, b.port, [(topics.frames("cam-1"), frame_payload(f"c1-{i}", "cam-1", seq=i))
                                     for i in range(3)] + [(topics.frames("cam-2"), frame_payload("c2-0", "cam-2"))])
        wait_for(lambda: store.count_frames() == 4, 10, what="4 frames stored")
        publish_all(b.host, b.port, [
            (topics.frames("cam-1"), frame_payload("c1-1", "cam-1", seq=1)),                 # stored before
            (topics.frames("cam-1"), frame_payload("c1-bad", "cam-1", image=b"\x00" * 300)),  # bad_image
            (topics.frames("cam-1"), frame_payload("c2-0", "cam-1")),   # another device's id: a conflict
            (topics.frames("cam-1"), b"\xff\xff not a frame"),          # unnamed: no frame id to give
        ])
        wait_for(lambda: sum(len(r.refused) for r in receipts_of(col, "cam-1")) == 2, 10,
                 what="the refusals receipted")
        wait_for(lambda: sum(len(r.frame_ids) for r in receipts_of(col, "cam-1")) == 4, 10, what="4 durable")
        got: Dict[str, List[str]] = {"durable": [], "refused": []}
        for r in receipts_of(col, "cam-1"):
            assert r.device_id == "cam-1" and r.hub_id == "hub-rc" and r.committed_ms > 0
            got["durable"] += list(r.frame_ids)
            got["refused"] += [f"{x.frame_id}:{x.reason}" for x in r.refused]
        assert sorted(got["durable"]) == ["c1-0", "c1-1", "c1-1", "c1-2"]  # the redelivery is durable too
        assert sorted(got["refused"]) == ["c1-bad:bad_image", "c2-0:frame_id_conflict"]
        assert [list(r.frame_ids) for r in receipts_of(col, "cam-2")] == [["c2-0"]]
        h = ing.health()
        assert h["frames_receipted"] == 5 and h["receipts"] == len(col.payloads("/receipts"))
    finally:
        ing.stop()
        col.close()
        store.close()


def test_a_hub_with_receipts_off_sends_none_and_announces_nothing(broker_factory: Any, tmp_path: Path) -> None:
    b = broker_factory()
    store = SqliteStore(tmp_path / "hub.db")
    ing = make_ingest(b, store, f"g{uuid.uuid4().hex[:8]}", receipts=False)
    col = Collector(b.host, b.port, [topics.receipts("cam-1"), topics.HUB_ANNOUNCE])
    try:
        publish_all(b.host, b.port, [(topics.frames("cam-1"), frame_payload("off-1", "cam-1"))])
        wait_for(lambda: ing.health()["acked"] == 1, 10, what="acknowledged")
        assert col.messages == [] and ing.health()["receipts"] == 0
    finally:
        ing.stop()
        col.close()
        store.close()


def test_a_lost_session_is_a_warning_a_count_and_a_resend_request(broker_factory: Any, tmp_path: Path,
                                                                  caplog: Any) -> None:
    """The broker restarts without its store: the reconnect finds no session. The same after a restart of
    the hub itself (its session file says the broker had one); a brand-new hub's first session is not."""
    b = broker_factory()  # persistence false: a restart forgets every session
    cfg = MqttSection(share_group=f"g{uuid.uuid4().hex[:8]}", reconnect_min_s=0.05, reconnect_max_s=0.2)
    session_file = tmp_path / "mqtt-session.json"
    link = MqttLink(BrokerTarget(b.host, b.port), cfg, "hub-sess", deliver=lambda m: None, session_file=session_file)
    link.start()
    try:
        assert link.wait_subscribed(10)
        assert link.sessions_lost == 0 and session_file.exists()  # the first session of a new hub: expected
        b.stop()
        b.start()
        wait_for(lambda: link.generation == 2 and link.connected, 10, what="reconnected")
        assert link.session_present is False and link.sessions_lost == 1 and link.resend_requests == 1
    finally:
        link.stop()
    assert any("no longer had this hub's session" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    b.stop()
    b.start()  # the session is gone again while the hub is down: the next hub process notices from the file
    requests = Collector(b.host, b.port, [topics.HUB_RESEND])
    again = MqttLink(BrokerTarget(b.host, b.port), cfg, "hub-sess", deliver=lambda m: None, session_file=session_file)
    again.start()
    try:
        assert again.wait_subscribed(10)
        assert again.sessions_lost == 1 and again.resend_requests == 1
        msg = kestrel_pb2.ResendRequest.FromString(requests.wait_count(1, timeout=10)[0])
        assert msg.hub_id == "hub-sess" and msg.reason == "hub session lost"
        assert again.stats()["sessions_lost"] == 1
    finally:
        again.stop()
        requests.close()
