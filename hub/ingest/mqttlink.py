"""The ingest's MQTT connection: connect, subscribe, hand every message on, acknowledge what was committed.

* MQTT 3.1.1, persistent session (clean_session=False, a fixed client id): the broker queues this
  hub's share while it is down and resends what was delivered but not acknowledged. paho runs in
  manual-ack mode on its own network thread (``loop_start``); ``on_message`` only builds a
  :class:`~hub.ingest.message.Message` and hands it to ``deliver`` (the batch pipeline's queue).
* The subscriptions (frames and telemetry shared by ``share_group``, status not) are made again on
  every connection, whether or not the broker still had the session (``session_present`` is logged).
* ``ack(msgs)`` acknowledges committed messages in arrival order, only those of QoS > 0 that arrived on
  the current connection (``generation``): the broker resends older connections' messages, and a mid
  of a dead connection means nothing on a new one. A batch's QoS 1 PUBACKs go out as one write
  (hub.ingest.pahohooks, ADR 0011).
* Reconnects wait as proto.backoff.Backoff says (``[mqtt] reconnect_min_s`` doubling up to
  ``reconnect_max_s``, back to the start only after a connection stayed up STABLE_CONNECTION_S), the
  same rule as the devices' link. paho's thread reconnects; before each wait this link tells it how
  long, through paho's public ``reconnect_delay_set`` (it then waits exactly that).
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any, Callable, Dict, List, Tuple

import paho.mqtt.client as mqtt

from hub.broker import BrokerTarget
from hub.config import MqttSection
from hub.errors import ConfigError
from hub.ingest import pahohooks
from hub.ingest.message import Message
from proto import topics
from proto.backoff import Backoff
from proto.clock import now_ms

log = logging.getLogger("hub.ingest.mqttlink")

MAX_INFLIGHT = 100  # QoS 1 messages the broker sends before it waits for our (late) acks
STABLE_CONNECTION_S = 10.0  # a connection up this long starts the reconnect backoff from its minimum again


class MqttLink:
    """``start()`` returns at once (connects in the background); ``deliver`` runs on paho's thread."""

    def __init__(self, target: BrokerTarget, cfg: MqttSection, client_id: str,
                 deliver: Callable[[Message], None]) -> None:
        self.target = target
        self.cfg = cfg
        self.client_id = client_id
        self._deliver = deliver
        self._lock = threading.Lock()  # generation vs acks: no ack of an old connection goes out on a new one
        self.generation = 0  # connections so far (written on paho's thread, under _lock)
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self.backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, STABLE_CONNECTION_S)  # paho's thread only
        self.failed_attempts = 0  # connection attempts that failed (no TCP/TLS connection)
        self.acks_batched = 0  # PUBACKs queued as part of a batched write
        self.acks_single = 0  # acks queued one by one (Client.ack)
        self.ack_writes = 0  # packet buffers queued for acks (a batched write counts once)
        self.client = self._make_client()
        self._puback_queue = pahohooks.puback_queue(self.client)

    @property
    def hooks(self) -> Dict[str, bool]:
        """Which of paho's private hooks this link uses (False: paho's own way, logged when the link was
        made; ADR 0011)."""
        return {"read_ahead": isinstance(self.client, pahohooks.Client),
                "batched_puback": self._puback_queue is not None}

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _make_client(self) -> mqtt.Client:
        c = pahohooks.make_client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                                  protocol=mqtt.MQTTv311)
        c.manual_ack_set(True)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        self._set_delay(c, self.cfg.reconnect_min_s)
        if self.target.username:
            c.username_pw_set(self.target.username, self.target.password or None)
        if self.target.tls:
            try:
                c.tls_set(ca_certs=self.target.ca_file or None, certfile=self.target.cert_file or None,
                          keyfile=self.target.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"[mqtt] TLS: cannot load ca_file/cert_file/key_file "
                                  f"({self.target.ca_file or 'system CAs'}, {self.target.cert_file or '-'}, "
                                  f"{self.target.key_file or '-'}): {exc}") from exc
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = lambda *a, **k: self._subscribed.set()
        return c

    @staticmethod
    def _set_delay(client: mqtt.Client, wait: float) -> None:
        # min == max: paho waits exactly this long before its next attempt (it resets its own doubling)
        client.reconnect_delay_set(wait, wait)  # type: ignore[arg-type]  # typed int, takes seconds as float

    def subscriptions(self) -> List[Tuple[str, int]]:
        g = self.cfg.share_group
        frames = topics.shared(g, topics.ALL_FRAMES) if g else topics.ALL_FRAMES
        tele = topics.shared(g, topics.ALL_TELEMETRY) if g else topics.ALL_TELEMETRY
        # status is not shared: retained messages are not sent to shared subscriptions, and every
        # hub applying the same status is harmless (idempotent upsert).
        return [(frames, topics.QOS_FRAMES), (tele, topics.QOS_TELEMETRY),
                (topics.ALL_STATUS, topics.QOS_STATUS)]

    # ---- paho's callbacks (its network thread) ----
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker %s:%d refused the connection: %s", self.target.host, self.target.port, reason)
            return  # paho calls on_disconnect next: the backoff applies
        with self._lock:
            self.generation += 1
        self._connected.set()
        self.backoff.up()
        log.info("connected to %s:%d as %s (session present: %s)", self.target.host, self.target.port,
                 self.client_id, getattr(flags, "session_present", "?"))
        client.subscribe(self.subscriptions())

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.failed_attempts += 1
        wait = self.backoff.next()
        self._set_delay(client, wait)
        log.debug("cannot connect to %s:%d; next attempt in %.1fs", self.target.host, self.target.port, wait)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       props: Any = None) -> None:
        self._connected.clear()
        self.backoff.stable()  # up for STABLE_CONNECTION_S: start from the minimum again
        wait = self.backoff.next()
        self._set_delay(client, wait)
        if not self._stopping.is_set():
            log.warning("disconnected from the broker (%s); reconnecting in %.1fs", reason, wait)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # generation is written only on this (paho's) thread: reading it here needs no lock
        self._deliver(Message(msg.mid, msg.qos, msg.topic, bytes(msg.payload), self.generation, now_ms()))

    # ---- lifecycle ----
    def start(self) -> None:
        self.client.connect_async(self.target.host, self.target.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        self.client.disconnect()
        self.client.loop_stop()

    # ---- acknowledgements (the pipeline's commit thread) ----
    def ack(self, msgs: List[Message]) -> int:
        """Acknowledge committed messages in arrival order: those of QoS > 0 delivered on the current
        connection (the broker resends the others). Returns how many were acknowledged."""
        with self._lock:
            due = [m for m in msgs if m.qos > 0 and m.generation == self.generation]
            ones = [m.mid for m in due if m.qos == 1]
            if self._puback_queue is not None and len(ones) > 1:
                pahohooks.queue_pubacks(self._puback_queue, ones)
                self.acks_batched += len(ones)
                self.ack_writes += 1
                rest = [m for m in due if m.qos != 1]
            else:
                rest = due
            for m in rest:
                self.client.ack(m.mid, m.qos)
            self.acks_single += len(rest)
            self.ack_writes += len(rest)
        return len(due)
