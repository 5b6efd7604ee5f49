"""The ingest's MQTT link against a real Mosquitto: reconnects as proto.backoff.Backoff says, and acks only
what arrived on the current connection."""

from __future__ import annotations

import uuid
from typing import Any, List

from hub.broker import BrokerTarget, free_port
from hub.config import MqttSection
from hub.ingest import mqttlink
from hub.ingest.message import Message
from hub.ingest.mqttlink import MqttLink
from proto import topics
from tests.helpers.wait import wait_for
from tests.hub import frame_payload, publish_all


def _link(port: int, got: List[Message], **cfg: Any) -> MqttLink:
    return MqttLink(BrokerTarget("127.0.0.1", port), MqttSection(share_group=f"g{uuid.uuid4().hex[:8]}", **cfg),
                    f"link-{uuid.uuid4().hex[:8]}", deliver=got.append)


def test_reconnects_follow_the_shared_backoff(broker_factory: Any) -> None:
    """No broker yet: the waits double from reconnect_min_s up to reconnect_max_s (one per failed attempt).
    The broker comes: connected and subscribed. It restarts: the link reconnects, and since that
    connection was up less than STABLE_CONNECTION_S the wait does not start from the minimum again."""
    port = free_port()
    got: List[Message] = []
    link = _link(port, got, reconnect_min_s=0.05, reconnect_max_s=0.2)
    link.start()
    try:
        wait_for(lambda: len(link.backoff.history) >= 4, 10, what="4 failed connection attempts")
        assert list(link.backoff.history)[:4] == [0.05, 0.1, 0.2, 0.2] and not link.connected
        broker = broker_factory(port=port)
        assert link.wait_subscribed(10), "no connection once the broker is up"
        assert link.connected and link.generation == 1
        assert link.failed_attempts == len(link.backoff.history)  # one wait per failed attempt
        waits = len(link.backoff.history)
        broker.stop()
        wait_for(lambda: not link.connected, 10, what="the link noticed the broker is gone")
        broker.start()
        wait_for(lambda: link.generation == 2 and link.connected, 10, what="reconnected to the restarted broker")
        assert list(link.backoff.history)[waits] == 0.2  # up < STABLE_CONNECTION_S: no fresh start
        publish_all(broker.host, broker.port, [(topics.frames("cam-1"), frame_payload("after", "cam-1"))])
        wait_for(lambda: any(m.topic == topics.frames("cam-1") for m in got), 10,
                 what="a frame on the new connection (re-subscribed)")
    finally:
        link.stop()


def test_a_connection_that_stayed_up_restarts_the_backoff(broker_factory: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(mqttlink, "STABLE_CONNECTION_S", 0.0)  # every connection counts as stable
    broker = broker_factory()
    link = _link(broker.port, [], reconnect_min_s=0.05, reconnect_max_s=0.4)
    link.start()
    try:
        assert link.wait_subscribed(10)
        for _ in range(2):  # two drops in a row: the wait after each starts from the minimum again
            gen, n = link.generation, len(link.backoff.history)
            broker.stop()
            wait_for(lambda: not link.connected, 10, what="disconnected")
            broker.start()
            wait_for(lambda g=gen: link.generation == g + 1, 10, what="reconnected")
            assert link.backoff.history[n] == 0.05
    finally:
        link.stop()


def test_messages_of_an_earlier_connection_are_not_acknowledged(broker_factory: Any) -> None:
    """Their mids mean nothing on the new connection; the broker resends them itself."""
    broker = broker_factory()
    got: List[Message] = []
    link = _link(broker.port, got)
    link.start()
    try:
        assert link.wait_subscribed(10)
        publish_all(broker.host, broker.port,
                    [(topics.frames("cam-1"), frame_payload(f"a{i}", "cam-1", seq=i)) for i in range(3)])
        wait_for(lambda: len(got) == 3, 10, what="3 frames")
        old = list(got)
        broker.stop()
        wait_for(lambda: not link.connected, 10, what="disconnected")
        broker.start()
        wait_for(lambda: link.connected, 10, what="reconnected")
        assert link.ack(old) == 0 and link.ack_writes == 0
        qos0 = Message(0, 0, topics.telemetry("cam-1"), b"", link.generation, 0)
        assert link.ack([qos0]) == 0  # QoS 0 needs no ack
    finally:
        link.stop()
