"""The ingest's MQTT connection: connect, subscribe, hand every message on, acknowledge what was committed.

* MQTT 5, persistent session (clean_start=False, session expiry "never", a fixed client id): the
  broker queues this hub's share while it is down and resends what was delivered but not
  acknowledged. paho runs in manual-ack mode on its own network thread (``loop_start``);
  ``on_message`` only builds a :class:`~hub.ingest.message.Message` and hands it to ``deliver`` (the
  batch pipeline's queue).
* Bounded before memory: CONNECT carries Maximum Packet Size (``packet_limit``: the frame limit plus
  room for topic and headers), so the broker never sends this client a larger packet (it drops it for
  us, as if delivered), and Receive Maximum (``[mqtt] receive_maximum`` messages unacknowledged at once).
* The subscriptions (frames and telemetry shared by ``share_group``, status not) are made again on
  every connection. The session is the hub's: ``session present: False`` on a connection that should
  have resumed one (a reconnect of this process, or the first connection after a restart when
  ``session_file`` says the broker had a session for this client id) means the broker lost the frames
  it held for the hub (a broker restarted without its store, or a client that took the hub's id with
  a clean session): a WARNING, counted in ``sessions_lost``, and a ``ResendRequest`` to every device.
  (A takeover itself is not told apart: Mosquitto 2.0 closes the connection without MQTT 5's "session
  taken over" reason; it shows as a lost session on the reconnect.)
* On every connection the hub (re)publishes the retained ``HubAnnouncement`` (it sends storage receipts,
  unless ``[mqtt] receipts = false``); ``publish_receipts`` sends the pipeline's receipts (QoS 1).
* ``ack(msgs)`` acknowledges committed messages in arrival order, only those of QoS > 0 that arrived on
  the current connection (``generation``): the broker resends older connections' messages, and a mid
  of a dead connection means nothing on a new one. A batch's QoS 1 PUBACKs go out as one write
  (hub.ingest.pahohooks, ADR 0011).
* A share-group worker (``[mqtt] session_expiry_s`` >= 0, usually 0): its session ends with its connection
  (or that many seconds later), and with it its place in the share group: Mosquitto keeps an offline
  member whose session lives in the rotation, and its share of the frames would wait for it. Its CONNECT
  carries a last will, a ``ResendRequest`` delayed by the same time (MQTT 5 Will Delay Interval): the broker
  publishes it when the session ends, and the devices resend, to the workers still there, the frames the
  broker dropped with the session (in flight to the worker, or queued for it). A graceful ``stop`` ends the
  session at once and asks for the will too ("disconnect with will message").
  docs/adr/0022-hub-workers-and-blobs-in-the-store.md.
* Reconnects wait as proto.backoff.Backoff says (``[mqtt] reconnect_min_s`` doubling up to
  ``reconnect_max_s``, back to the start only after a connection stayed up STABLE_CONNECTION_S), the
  same rule as the devices' link. paho's thread reconnects; before each wait this link tells it how
  long, through paho's public ``reconnect_delay_set`` (it then waits exactly that).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hub.broker import BrokerTarget, packet_limit
from hub.config import MqttSection
from hub.errors import ConfigError
from hub.ingest import pahohooks
from hub.ingest.message import Message
from proto import atomic, kestrel_pb2, topics
from proto.backoff import Backoff
from proto.clock import now_ms

log = logging.getLogger("hub.ingest.mqttlink")

MAX_INFLIGHT = 100  # QoS 1 messages we publish (receipts, desired states) before paho waits for PUBACKs
SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # the broker keeps the session until persistent_client_expiration
STABLE_CONNECTION_S = 10.0  # a connection up this long starts the reconnect backoff from its minimum again


class MqttLink:
    """``start()`` returns at once (connects in the background); ``deliver`` runs on paho's thread."""

    def __init__(self, target: BrokerTarget, cfg: MqttSection, client_id: str,
                 deliver: Callable[[Message], None], session_file: Optional[Path] = None) -> None:
        """``session_file``: where the hub remembers that the broker holds a session for this client id
        (in its data_dir), so a session missing after a restart is noticed; None = only reconnects of
        this process are checked."""
        self.target = target
        self.cfg = cfg
        self.client_id = client_id
        self._deliver = deliver
        self.session_file = session_file
        self.sessions_lost = 0  # connections that should have resumed the session and did not
        self.resend_requests = 0  # ResendRequests published
        self.receipts_sent = 0  # Receipt messages handed to paho
        self.session_present: Optional[bool] = None  # what the last CONNACK said
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

    @property
    def worker(self) -> bool:
        """A share-group worker whose session ends with its connection, or soon after ([mqtt] session_expiry_s
        >= 0; -1 = never)."""
        return self.cfg.session_expiry_s >= 0

    def connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_NEVER_EXPIRES if not self.worker else self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.receive_maximum
        props.MaximumPacketSize = packet_limit(self.cfg.max_payload_bytes)
        return props

    def _make_client(self) -> mqtt.Client:
        c = pahohooks.make_client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5)
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
        if self.worker and self.cfg.receipts:
            self._set_will(c)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = lambda *a, **k: self._subscribed.set()
        return c

    def _set_will(self, client: mqtt.Client) -> None:
        """The worker's last will: a ResendRequest the broker publishes when the session ends (never while the
        worker is back within session_expiry_s: MQTT 5 drops a delayed will on a reconnect)."""
        props = Properties(PacketTypes.WILLMESSAGE)
        props.WillDelayInterval = self.cfg.session_expiry_s
        will = kestrel_pb2.ResendRequest(time_ms=now_ms(), hub_id=self.client_id,
                                         reason=f"hub worker {self.client_id} left the share group")
        client.will_set(topics.HUB_RESEND, will.SerializeToString(), qos=topics.QOS_HUB, retain=False,
                        properties=props)

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
            reconnect = self.generation > 1
        present = bool(getattr(flags, "session_present", False))
        self.session_present = present
        self._connected.set()
        self.backoff.up()
        lost = not present and (reconnect or self._had_session())
        if lost and self.worker:
            self.sessions_lost += 1
            log.info("connected to %s:%d as %s; the broker ended this worker's session while it was away "
                     "([mqtt] session_expiry_s = %d; its last will asked the devices to resend): asking them once "
                     "more (%d sessions lost so far)", self.target.host, self.target.port, self.client_id,
                     self.cfg.session_expiry_s, self.sessions_lost)
        elif lost:
            self.sessions_lost += 1
            log.warning("connected to %s:%d as %s, but the broker no longer had this hub's session (a broker "
                        "restarted without its store, or another client took the id %s with a clean session): "
                        "frames it held for the hub are gone from it; asking every device to resend the frames "
                        "it has no storage receipt for (%d sessions lost so far)", self.target.host,
                        self.target.port, self.client_id, self.client_id, self.sessions_lost)
        else:
            log.info("connected to %s:%d as %s (session present: %s)", self.target.host, self.target.port,
                     self.client_id, present)
        client.subscribe(self.subscriptions())
        self._remember_session()
        if self.cfg.receipts:
            self._publish(topics.HUB_ANNOUNCE, kestrel_pb2.HubAnnouncement(
                receipts=True, time_ms=now_ms(), hub_id=self.client_id).SerializeToString(), retain=True)
        if lost:
            self.resend_requests += 1
            self._publish(topics.HUB_RESEND, kestrel_pb2.ResendRequest(
                time_ms=now_ms(), reason="hub session lost", hub_id=self.client_id).SerializeToString())

    # ---- the session file ----
    def _session_key(self) -> Dict[str, str]:
        return {"client_id": self.client_id, "broker": f"{self.target.host}:{self.target.port}"}

    def _had_session(self) -> bool:
        """The broker had a session for this client id when this hub last connected to it."""
        if self.session_file is None:
            return False
        try:
            return bool(json.loads(self.session_file.read_text()) == self._session_key())
        except (OSError, ValueError):
            return False

    def _remember_session(self) -> None:
        if self.session_file is None or self._had_session():
            return
        try:
            atomic.write_text(self.session_file, json.dumps(self._session_key()) + "\n")
        except OSError as exc:  # only makes a later warning less likely: never stop the ingest for it
            log.warning("cannot write %s: %s", self.session_file, exc.strerror or exc)

    # ---- what the hub publishes ----
    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=topics.QOS_HUB, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued for the next one
            log.warning("cannot publish on %s: %s", topic, mqtt.error_string(info.rc))

    def publish_receipts(self, receipts: List[kestrel_pb2.Receipt]) -> None:
        """One QoS 1 Receipt per device (the pipeline's commit thread; paho queues it for its thread)."""
        for r in receipts:
            self.client.publish(topics.receipts(r.device_id), r.SerializeToString(), qos=topics.QOS_RECEIPTS)
        self.receipts_sent += len(receipts)

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
        self.client.connect_async(self.target.host, self.target.port, keepalive=self.cfg.keepalive_s,
                                  clean_start=False, properties=self.connect_properties())
        self.client.loop_start()

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        if self.worker:
            # leave the share group now (the others take the whole stream) and have the broker publish the
            # will: the devices resend what this worker got and did not receipt
            props = None
            if self.cfg.session_expiry_s > 0:  # MQTT 5: only a session that would outlive the connection may change
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
            reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message") if self.cfg.receipts else None
            self.client.disconnect(reasoncode=reason, properties=props)
        else:
            self.client.disconnect()
        self.client.loop_stop()

    def stats(self) -> Dict[str, Any]:
        return {"sessions_lost": self.sessions_lost, "session_present": self.session_present,
                "resend_requests": self.resend_requests, "receipts_sent": self.receipts_sent}

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
