"""paho's private hooks under the ingest (hub/ingest/pahohooks.py, docs/adr/0011-paho-private-hooks.md).

The read-ahead socket and the batched PUBACK write each have a fallback, so a paho release that renames
or stops calling what they hook would make the ingest silently slower, not wrong. The two
``test_paho_still_takes_*`` tests are what notices: they FAIL when a hook is no longer taken with the
installed paho (the fix: adapt pahohooks.py to the new paho, or pin paho below the release; ADR 0011).
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any, List

import paho.mqtt.client as mqtt
import pytest

from hub.broker import BrokerTarget
from hub.config import MqttSection
from hub.ingest import pahohooks
from hub.ingest.message import Message
from hub.ingest.mqttlink import MqttLink
from hub.ingest.pahohooks import ReadAheadSocket
from proto import topics
from tests.helpers.wait import wait_for
from tests.hub import frame_payload, jpeg, publish_all

LOUD = f"with paho-mqtt {pahohooks.PAHO_VERSION}: see docs/adr/0011-paho-private-hooks.md"


def test_small_reads_are_served_from_one_recv_and_pending_counts_them() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        calls = []

        class Counting:
            def recv(self, n: int) -> bytes:
                calls.append(n)
                return b.recv(n)

            def fileno(self) -> int:
                return b.fileno()
        s = ReadAheadSocket(Counting(), size=1024)
        a.sendall(b"\x30\x83\x01" + b"x" * 131 + b"\x40\x02\x00\x01")
        assert s.recv(1) == b"\x30" and s.pending() == 137
        assert s.recv(1) + s.recv(1) == b"\x83\x01"
        assert s.recv(200) == b"x" * 131 + b"\x40\x02\x00\x01"  # at most what is buffered
        assert s.pending() == 0 and calls == [1024]
        assert s.fileno() == b.fileno()  # everything else goes to the socket
        with pytest.raises(BlockingIOError):  # nothing buffered, nothing in the kernel: as paho expects
            s.recv(1)
        a.sendall(b"y" * 5000)
        assert s.recv(4000) == b"y" * 4000 and s.recv(4000) == b"y" * 1000  # large reads straight through
        a.close()
        assert s.recv(1) == b""  # closed
    finally:
        b.close()


def _link(broker: Any, got: List[Message], client_id: str = "", group: str = "") -> MqttLink:
    link = MqttLink(BrokerTarget(broker.host, broker.port),
                    MqttSection(share_group=group or f"g{uuid.uuid4().hex[:8]}"),
                    client_id or f"hooks-{uuid.uuid4().hex[:8]}", deliver=got.append)
    link.start()
    assert link.wait_subscribed(10), "the link did not subscribe"
    return link


def test_paho_still_takes_the_read_ahead_hook(broker_factory: Any) -> None:
    """paho must create its socket through Client._create_socket and read every packet through it."""
    assert pahohooks.read_ahead_supported(), f"paho's Client has no _create_socket any more {LOUD}"
    broker = broker_factory()
    got: List[Message] = []
    link = _link(broker, got)
    try:
        assert isinstance(link.client, pahohooks.Client), f"the link does not use the read-ahead client {LOUD}"
        assert link.client.sockets_wrapped == 1, f"paho no longer calls Client._create_socket {LOUD}"
        sock = link.client.socket()  # paho's public accessor: the socket its loop reads from
        assert isinstance(sock, ReadAheadSocket), f"paho does not read from the socket it created {LOUD}"
        before = sock.recv_calls
        publish_all(broker.host, broker.port,
                    [(topics.frames("cam-r"), frame_payload(f"r{i}", "cam-r", seq=i)) for i in range(50)])
        wait_for(lambda: len(got) == 50, 10, what="50 frames through the read-ahead socket")
        # paho asks for ~5 reads per packet; read ahead, far fewer reach the kernel
        assert 0 < sock.recv_calls - before < 50, f"{sock.recv_calls - before} recv calls for 50 packets {LOUD}"
    finally:
        link.stop()


def test_paho_still_takes_the_batched_puback_hook(broker_factory: Any) -> None:
    """The PUBACKs of a batch go onto paho's packet queue as one write, and the broker takes every one of
    them (nothing is resent to the next connection with the same client id)."""
    broker = broker_factory()
    got: List[Message] = []
    cid, group = f"hooks-{uuid.uuid4().hex[:8]}", f"g{uuid.uuid4().hex[:8]}"
    link = _link(broker, got, cid, group)
    assert link.hooks["batched_puback"], f"paho's Client._packet_queue is gone or takes other arguments {LOUD}"
    publish_all(broker.host, broker.port,
                [(topics.frames("cam-p"), frame_payload(f"p{i}", "cam-p", seq=i)) for i in range(20)])
    wait_for(lambda: len(got) == 20, 10, what="20 frames")
    assert link.ack(got) == 20
    assert (link.acks_batched, link.acks_single, link.ack_writes) == (20, 0, 1), \
        f"the batched PUBACK write was not taken {LOUD}"
    # The broker handles one client's packets in order: once it acknowledges a publish queued after the
    # PUBACKs, it has processed them (want_write() alone only says paho's queue is empty).
    marker = link.client.publish(f"test/{cid}/marker", b"", qos=1)
    marker.wait_for_publish(10)
    assert marker.is_published()
    link.stop()
    again: List[Message] = []
    link2 = _link(broker, again, cid, group)
    try:
        publish_all(broker.host, broker.port, [(topics.frames("cam-p"), frame_payload("p-last", "cam-p"))])
        wait_for(lambda: any(m.topic == topics.frames("cam-p") for m in again), 10, what="the next frame")
        assert len(again) == 1, f"the broker resent {len(again) - 1} acknowledged frames: PUBACKs lost {LOUD}"
    finally:
        link2.stop()


def test_the_fallbacks_are_detected_and_still_deliver_and_acknowledge(
        broker_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A paho without the hooks: each is reported as not taken (a warning), and the plain client still
    receives and acknowledges every message (one ack per message)."""
    monkeypatch.delattr(mqtt.Client, "_packet_queue")
    assert pahohooks.puback_queue(mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)) is None
    monkeypatch.undo()
    monkeypatch.setattr(pahohooks, "read_ahead_supported", lambda: False)
    monkeypatch.setattr(pahohooks, "puback_queue", lambda client: None)
    broker = broker_factory()
    got: List[Message] = []
    cid, group = f"hooks-{uuid.uuid4().hex[:8]}", f"g{uuid.uuid4().hex[:8]}"
    link = _link(broker, got, cid, group)
    assert link.hooks == {"read_ahead": False, "batched_puback": False}
    assert not isinstance(link.client.socket(), ReadAheadSocket)
    publish_all(broker.host, broker.port,
                [(topics.frames("cam-f"), frame_payload(f"f{i}", "cam-f", seq=i)) for i in range(10)])
    wait_for(lambda: len(got) == 10, 10, what="10 frames without read-ahead")
    assert link.ack(got) == 10 and (link.acks_batched, link.acks_single) == (0, 10)
    # The broker handles one client's packets in order: once it acknowledges a publish queued after the
    # PUBACKs, it has processed them (want_write() alone only says paho's queue is empty).
    marker = link.client.publish(f"test/{cid}/marker", b"", qos=1)
    marker.wait_for_publish(10)
    assert marker.is_published()
    link.stop()
    again: List[Message] = []
    link2 = _link(broker, again, cid, group)
    try:
        publish_all(broker.host, broker.port, [(topics.frames("cam-f"), frame_payload("f-last", "cam-f"))])
        wait_for(lambda: len(again) >= 1, 10, what="the next frame")
        assert len(again) == 1  # every ack of the fallback reached the broker
    finally:
        link2.stop()


def test_the_ingest_reads_ahead_over_tls_and_stores_every_frame(tmp_path: Path) -> None:
    """The read-ahead wrapper sits over the TLS socket when the broker is TLS: paho's reads of 50 KB
    frames that span TLS records, and its pending() check, must still deliver every frame, once."""
    from hub.ingest.service import Ingest
    from hub.store.sqlite import SqliteStore
    from tests.helpers.broker import Mosquitto
    from tests.helpers.tlscerts import make_tls

    store = SqliteStore(tmp_path / "hub.db")
    tls = make_tls(tmp_path / "tls")
    b = Mosquitto(tmp_path / "mosq-tls", tls=(tls.ca, tls.cert, tls.key)).start()
    ing = Ingest(store, BrokerTarget(b.host, b.port, tls=True, ca_file=str(tls.ca)),
                 MqttSection(share_group=f"g{uuid.uuid4().hex[:8]}", retry_initial_s=0.05, retry_max_s=0.3),
                 f"hub-{uuid.uuid4().hex[:8]}", dead_letter_dir=tmp_path / "dead")
    try:
        ing.start()
        assert ing.wait_subscribed(10), "ingest did not subscribe over TLS"
        assert isinstance(ing.client.socket(), ReadAheadSocket)  # the wrapper really is over the TLS socket
        images = [jpeg(i, w=280, h=210) for i in range(3)]  # ~50 KB each: many TLS records per frame
        items = [(topics.frames("cam-t"), frame_payload(f"cam-t-{i}", "cam-t", seq=i,
                                                        image=images[i % 3]))
                 for i in range(60)]
        publish_all(b.host, b.port, items, ca_file=str(tls.ca))
        wait_for(lambda: store.count_frames() == 60, 30, what="60 frames stored over TLS")
        got = store.get_frame("cam-t-31")
        assert got is not None and got.image == images[1]
        h = ing.health()
        assert h["stored"] == 60 and h["duplicates"] == 0 and sum(h["rejected"].values()) == 0, h
    finally:
        ing.stop()
        b.stop()
        store.close()
