"""Keeping signed things valid while the hub runs (``Renewer``, a thread of ``kestrel-hub serve``):

* **retained desired state**: every ``refresh_interval_s`` the retained messages on the desired
  topics (the renewer's own MQTT connection, with the hub's identity, subscribes to them) that are
  exactly the last message this fleet key directory signed for their topic (FleetSigner.last_signed)
  and have less than half of ``desired_ttl_s`` left (or already expired: the hub was down) are signed
  again with a new sequence and expiry, same content, and published retained. Devices see a newer
  message with the same intent (nothing to do). One signed by another key (the previous fleet key,
  after ``[security] fleet_key_file`` was changed) is re-signed at once: a fleet key rotation.
  Anything else (unsigned, forged, an older message of ours replayed onto the broker) is never
  re-signed: the hub would launder it;
* **the CRL**: rewritten when less than half of its validity is left; the embedded broker reloads.

Several hubs of one fleet may each run a renewer: they re-sign the same content. A deploy from one
hub that arrives between another's read and re-publish could be overwritten by the older content;
the window is one publish round trip once per ``desired_ttl_s / 2`` (docs/security.md).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import paho.mqtt.client as mqtt

from hub.broker import BrokerTarget
from hub.errors import ConfigError, TransportError
from hub.security.fleetkey import FleetSigner
from proto import desired, kestrel_pb2, topics

log = logging.getLogger("hub.security")

DESIRED_TOPICS = (f"{topics.PREFIX}/devices/+/desired", f"{topics.PREFIX}/groups/+/desired")
PUBLISH_TIMEOUT_S = 10.0
FIRST_RENEW_S = 5.0  # the first pass after the start: the retained messages have arrived by then


def mqtt_client(target: BrokerTarget, client_id: str) -> mqtt.Client:
    """A paho client for ``target`` (TLS, client certificate, username) like the ingest's."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                    protocol=mqtt.MQTTv311)
    if target.username:
        c.username_pw_set(target.username, target.password or None)
    if target.tls:
        try:
            c.tls_set(ca_certs=target.ca_file or None, certfile=target.cert_file or None,
                      keyfile=target.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"[mqtt] TLS files unusable for the renewer: {exc}") from exc
    return c


class Renewer:
    def __init__(self, target: BrokerTarget, client_id: str, signer: FleetSigner, interval_s: float,
                 renew_crl: Optional[Callable[[], None]] = None, crl_due: Optional[Callable[[], bool]] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.signer = signer
        self.interval_s = interval_s
        self._renew_crl = renew_crl
        self._crl_due = crl_due
        self._clock = clock
        self._latest: Dict[str, kestrel_pb2.DesiredState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.renewed = 0
        self.client = mqtt_client(target, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a, **k: self._subscribed.set()

    # ---- MQTT thread ----
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.error("renewer: the broker refused the connection: %s", reason)
            return
        client.subscribe([(t, topics.QOS_DESIRED) for t in DESIRED_TOPICS])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if not msg.payload:
                self._latest.pop(msg.topic, None)
                return
            try:
                self._latest[msg.topic] = kestrel_pb2.DesiredState.FromString(bytes(msg.payload))
            except Exception:  # noqa: BLE001 - not ours to judge here: it is simply never re-signed
                self._latest.pop(msg.topic, None)

    # ---- lifecycle ----
    def start(self) -> Renewer:
        self.client.connect_async(self.target.host, self.target.port, keepalive=60)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="renewer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.client.loop_stop()
        self.client.disconnect()

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._subscribed.wait(timeout)

    def _run(self) -> None:
        # a first pass soon after the start (a hub that was down may find its orders expired), then
        # every interval
        if not self._stop.wait(min(FIRST_RENEW_S, self.interval_s)):
            try:
                self.renew_once()
            except Exception:  # noqa: BLE001
                log.exception("renewer: renewing failed (next try in %.0f s)", self.interval_s)
        while not self._stop.wait(self.interval_s):
            try:
                self.renew_once()
            except Exception:  # noqa: BLE001 - the renewer must survive anything; it tries again
                log.exception("renewer: renewing failed (next try in %.0f s)", self.interval_s)

    # ---- the work ----
    def due(self, now_ms: int) -> List[str]:
        """Topics whose retained message is the last one we signed for it and must be signed again now."""
        out = []
        half_ms = self.signer.ttl_ms // 2
        with self._lock:
            items = list(self._latest.items())
        for topic, msg in items:
            if not msg.signature or desired.digest(topic, msg) != self.signer.last_signed(topic):
                continue  # not exactly our last word on this topic: never re-signed
            if msg.key_id != self.signer.key_id or msg.expires_ms - now_ms < half_ms:
                out.append(topic)
        return out

    def renew_once(self) -> int:
        if self._crl_due is not None and self._renew_crl is not None and self._crl_due():
            self._renew_crl()
        n = 0
        for topic in self.due(int(self._clock() * 1000)):
            with self._lock:
                current = self._latest.get(topic)
            if current is None:
                continue
            fresh = kestrel_pb2.DesiredState()
            fresh.CopyFrom(current)
            self.signer.sign(topic, fresh)
            info = self.client.publish(topic, fresh.SerializeToString(), qos=topics.QOS_DESIRED, retain=True)
            try:
                info.wait_for_publish(PUBLISH_TIMEOUT_S)
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"renewer: cannot publish {topic}: {exc}") from exc
            if not info.is_published():
                raise TransportError(f"renewer: the broker did not acknowledge {topic}")
            self.signer.published(topic, fresh)
            with self._lock:
                self._latest[topic] = fresh
            n += 1
            log.info("renewed the signed desired state on %s (sequence %d)", topic, fresh.sequence)
        self.renewed += n
        return n
