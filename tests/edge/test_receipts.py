"""Storage receipts on the device: a frame leaves the spool when the hub's receipt names it, is published
again when no receipt comes, is set aside when the hub refuses it; ``delete_on`` decides per connection.

A real Mosquitto per test (a retained announcement must not leak into other tests) and a small "hub"
made of a paho client that publishes what the real hub publishes (tests/hub has the real one).
Python 3.8 compatible (the device suite runs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import paho.mqtt.client as paho

from edge.uplink.receipts import ReceiptBook
from proto import kestrel_pb2, topics
from tests.edge.test_publisher import decode_frames, frame, make_cfg, publishers  # noqa: F401 - fixture
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for


class FakeHub:
    """Publishes what a hub publishes: the retained announcement, receipts, resend requests."""

    def __init__(self, host: str, port: int) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()

    def announce(self, receipts: bool = True) -> None:
        self.publish(topics.HUB_ANNOUNCE, kestrel_pb2.HubAnnouncement(receipts=receipts, hub_id="t")
                     .SerializeToString(), retain=True)

    def receipt(self, device: str, ids: List[str], refused: Any = ()) -> None:
        msg = kestrel_pb2.Receipt(device_id=device, frame_ids=ids, hub_id="t",
                                  refused=[kestrel_pb2.RefusedFrame(frame_id=f, reason=r) for f, r in refused])
        self.publish(topics.receipts(device), msg.SerializeToString())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def ids_seen(col: Collector) -> List[str]:
    return [f.frame_id for f in decode_frames(col.payloads("/frames"))]


def test_with_an_announcing_hub_frames_stay_until_their_receipt(broker_factory, tmp_path: Path,  # noqa: ANN001
                                                                publishers) -> None:  # noqa: F811
    b = broker_factory()
    hub = FakeHub(b.host, b.port)
    hub.announce()
    dev = "rc1"
    pub = publishers(make_cfg(b.host, b.port), dev, tmp_path / "spool")
    pub.start()
    try:
        wait_for(lambda: pub.connected and pub.receipts.hub_receipts is True, 10, what="receipts on")
        for i in range(3):
            assert pub.publish_frame(frame(i, dev))
        wait_for(lambda: pub.frames_acked == 3, 10, what="3 PUBACKs")
        assert len(pub.spool) == 3 and pub.receipts.book.awaiting == 3  # the broker's word is not enough
        hub.receipt(dev, [f"{dev}-0", f"{dev}-2", "someone-else-7"])
        wait_for(lambda: len(pub.spool) == 1, 10, what="receipted frames deleted")
        assert pub.spool.seq_of(f"{dev}-1") == 1 and pub.receipts.frames_receipted == 2
        assert pub.receipts.received == 1 and pub.receipts.book.awaiting == 1
        hub.receipt(dev, [f"{dev}-1"])
        assert pub.flush(10) and len(pub.spool) == 0
    finally:
        hub.close()


def test_an_unreceipted_frame_is_resent_then_deleted_on_its_receipt(broker_factory, tmp_path: Path,  # noqa: ANN001
                                                                    publishers) -> None:  # noqa: F811
    b = broker_factory()
    hub = FakeHub(b.host, b.port)
    hub.announce()
    dev = "rc2"
    col = Collector(b.host, b.port, [topics.frames(dev)])
    pub = publishers(make_cfg(b.host, b.port, receipt_timeout_s=0.3, receipt_timeout_max_s=0.6), dev,
                     tmp_path / "spool")
    pub.start()
    try:
        wait_for(lambda: pub.receipts.hub_receipts is True, 10, what="receipts on")
        assert pub.publish_frame(frame(0, dev))
        wait_for(lambda: ids_seen(col).count(f"{dev}-0") >= 3, 10, what="two resends")
        assert pub.receipts.frames_resent >= 2 and len(pub.spool) == 1
        hub.receipt(dev, [f"{dev}-0"])
        wait_for(lambda: len(pub.spool) == 0, 10, what="deleted on the receipt")
        sent = pub.frames_sent
        assert pub.publish_frame(frame(1, dev))  # the pump goes on: the receipted one is not sent again
        wait_for(lambda: pub.frames_acked >= sent + 1, 10, what="the next frame acknowledged")
        hub.receipt(dev, [f"{dev}-1"])
        assert pub.flush(10)
        assert pub.frames_sent == sent + 1
    finally:
        col.close()
        hub.close()


def test_the_hubs_resend_request_sends_every_waiting_frame_now(broker_factory, tmp_path: Path,  # noqa: ANN001
                                                               publishers) -> None:  # noqa: F811
    b = broker_factory()
    hub = FakeHub(b.host, b.port)
    hub.announce()
    dev = "rc3"
    col = Collector(b.host, b.port, [topics.frames(dev)])
    pub = publishers(make_cfg(b.host, b.port, receipt_timeout_s=600.0, receipt_timeout_max_s=600.0), dev,
                     tmp_path / "spool")
    pub.start()
    try:
        wait_for(lambda: pub.receipts.hub_receipts is True, 10, what="receipts on")
        for i in range(4):
            pub.publish_frame(frame(i, dev))
        wait_for(lambda: pub.receipts.book.awaiting == 4, 10, what="4 frames waiting for receipts")
        hub.receipt(dev, [f"{dev}-1"])
        wait_for(lambda: pub.receipts.book.awaiting == 3, 10, what="one receipted")
        hub.publish(topics.HUB_RESEND, kestrel_pb2.ResendRequest(reason="session lost").SerializeToString())
        wait_for(lambda: len(ids_seen(col)) == 7, 10, what="the 3 unreceipted frames again")
        assert sorted(ids_seen(col)[4:]) == [f"{dev}-0", f"{dev}-2", f"{dev}-3"]
        assert pub.receipts.frames_resent == 3
    finally:
        col.close()
        hub.close()


def test_a_refused_frame_is_set_aside_and_a_frame_never_receipted_too(broker_factory, tmp_path: Path,  # noqa: ANN001
                                                                      publishers) -> None:  # noqa: F811
    b = broker_factory()
    hub = FakeHub(b.host, b.port)
    hub.announce()
    dev = "rc4"
    pub = publishers(make_cfg(b.host, b.port, receipt_timeout_s=0.2, receipt_timeout_max_s=0.2,
                              max_send_attempts=2), dev, tmp_path / "spool")
    pub.start()
    try:
        wait_for(lambda: pub.receipts.hub_receipts is True, 10, what="receipts on")
        for i in range(2):
            pub.publish_frame(frame(i, dev))
        wait_for(lambda: pub.receipts.book.awaiting == 2, 10, what="2 frames waiting")
        hub.receipt(dev, [], refused=[(f"{dev}-0", "bad_image")])
        wait_for(lambda: pub.receipts.refused == 1, 10, what="the refused frame set aside")
        assert [p.name for p in pub.spool.dead_letters()] == ["00000000000000000000.rec"]
        # frame 1: the hub keeps receipting other frames but never this one -> set aside after 2 strikes
        n = 2
        while pub.receipts.refused < 2:
            assert n < 40, "frame 1 was never set aside"
            fid = f"{dev}-{n}"
            pub.publish_frame(frame(n, dev))
            wait_for(lambda fid=fid: pub.spool.seq_of(fid) in pub.receipts.book, 10, what="acked")
            hub.receipt(dev, [fid])
            wait_for(lambda fid=fid: pub.spool.seq_of(fid) is None, 10, what="receipted")
            n += 1
        assert pub.spool.seq_of(f"{dev}-1") is None and len(pub.spool.dead_letters()) == 2
        assert pub.dead_letters == 2
    finally:
        hub.close()


def test_without_an_announcement_auto_deletes_on_puback_and_receipt_mode_keeps(broker_factory,  # noqa: ANN001
                                                                             tmp_path: Path,
                                                                             publishers) -> None:  # noqa: F811
    b = broker_factory()
    auto = publishers(make_cfg(b.host, b.port), "rc5", tmp_path / "a")
    strict = publishers(make_cfg(b.host, b.port, delete_on="receipt"), "rc6", tmp_path / "s")
    puback = publishers(make_cfg(b.host, b.port, delete_on="puback"), "rc7", tmp_path / "p")
    for p in (auto, strict, puback):
        p.start()
        assert p.publish_frame(frame(0, p.device_id))
    assert auto.flush(10) and puback.flush(10)  # an older hub (no announcement): the broker's word
    assert auto.receipts.hub_receipts is False and puback.receipts.subscriptions() == []
    wait_for(lambda: strict.frames_acked == 1, 10, what="strict: acknowledged")
    assert len(strict.spool) == 1 and strict.receipts.hub_receipts is True
    # a hub that starts announcing receipts later switches an auto device over on the same connection
    hub = FakeHub(b.host, b.port)
    try:
        hub.announce()
        wait_for(lambda: auto.receipts.hub_receipts is True, 10, what="auto follows the announcement")
        auto.publish_frame(frame(1, "rc5"))
        wait_for(lambda: auto.frames_acked == 2, 10, what="acknowledged")
        assert len(auto.spool) == 1
        hub.publish(topics.HUB_ANNOUNCE, b"", retain=True)  # withdrawn (a downgrade): back to PUBACK
        wait_for(lambda: auto.receipts.hub_receipts is False, 10, what="withdrawn")
    finally:
        hub.close()


def test_metrics_and_telemetry_report_receipts(broker_factory, tmp_path: Path, publishers) -> None:  # noqa: ANN001,F811
    from edge.config import TelemetryConfig
    from edge.telemetry.service import Stats, TelemetryService
    b = broker_factory()
    hub = FakeHub(b.host, b.port)
    hub.announce()
    dev = "rc8"
    pub = publishers(make_cfg(b.host, b.port), dev, tmp_path / "spool")
    pub.start()
    try:
        wait_for(lambda: pub.receipts.hub_receipts is True, 10, what="receipts on")
        for i in range(2):
            pub.publish_frame(frame(i, dev))
        wait_for(lambda: pub.receipts.book.awaiting == 2, 10, what="waiting")
        hub.receipt(dev, [f"{dev}-0"])
        wait_for(lambda: pub.receipts.frames_receipted == 1, 10, what="receipted")
        tel = TelemetryService(TelemetryConfig(metrics_port=0), dev, Stats(), pub)
        msg = tel.build_message()
        assert (msg.receipts, msg.frames_receipted, msg.frames_awaiting_receipt) == (1, 1, 1)
        assert msg.oldest_unreceipted_age_s >= 0.0 and msg.frames_resent == 0
        text = tel.render_metrics()
        assert "kestrel_edge_frames_receipted_total 1" in text and "kestrel_edge_frames_awaiting_receipt 1" in text
        assert "kestrel_edge_oldest_unreceipted_age_seconds" in text and "kestrel_edge_frames_resent_total 0" in text
    finally:
        hub.close()


def test_receipt_book_backoff_strikes_and_resend_requests() -> None:
    now = [100.0]
    book = ReceiptBook(10.0, 35.0, clock=lambda: now[0])
    book.acked(7)
    assert book.due(5) == [] and book.awaiting == 1
    now[0] = 110.0
    assert book.due(5) == [7] and book.strike(7) == 0  # no receipt for anything since: the hub may be down
    book.resending(7)
    assert book.awaiting == 0 and book.due(5) == []
    book.acked(7)  # second send acknowledged: twice the wait
    now[0] = 129.0
    assert book.due(5) == []
    now[0] = 130.0
    book.receipt_seen()  # the hub receipted others since its PUBACK: a strike
    assert book.due(5) == [7] and book.strike(7) == 1
    book.resending(7)
    book.acked(7)
    now[0] = 130.0 + 35.0  # capped at timeout_max_s (40 would be the doubled wait)
    assert book.due(5) == [7]
    book.acked(8)
    assert book.due(5) == [7] and book.due(5) == [7]  # still due until it is sent again
    book.receipt_seen()
    assert book.resend_all_now() == 2 and book.due(1) == [7]
    assert book.strike(7) == 1  # asked for by the hub: no strike, though receipts came since its PUBACK
    book.resending(8)
    assert book.awaiting == 1 and book.due(5) == [7]
    book.link_lost()  # a resend in flight got no PUBACK: due at once
    assert book.due(5) == [7, 8] and book.awaiting == 2
    book.forget(7)
    assert 7 not in book and len(book) == 1 and book.due(5) == [8]
