"""A grown-up MQTT connection around paho-mqtt 2.x (CallbackAPIVersion.VERSION2, MQTT 3.1.1).

One background I/O thread owns the paho client and is the only thread that ever writes to its
socket (paho's write path is not safe against concurrent writers: two threads could reorder or
interleave packets). Other threads hand work to it with :meth:`MqttClient.call_soon`; the owner of
the connection (edge.uplink.publisher) plugs in a ``pump`` callback that the I/O thread calls on every
turn to send what is due.

What it does for you:

* a last will (built by ``will()`` right before every connect attempt), set before connect;
* ``on_connected`` after every successful CONNACK (birth message, resend) and re-subscription of
  every :meth:`subscribe` d topic on every connection; ``on_disconnected(peer_closed)`` after a
  connection that got connected ended: ``peer_closed`` is True when the broker or the network closed
  it, False when we did (:meth:`stop`, or our own drop on a missing PUBACK);
* reconnect with exponential backoff ``reconnect_min_s`` .. ``reconnect_max_s``; the backoff is
  reset only after a connection stayed up for STABLE_CONNECTION_S, so a broker that accepts us and
  then drops us at once (e.g. on a packet it refuses) is not hammered;
* one WARNING line per outage (the first sign of trouble); later failed attempts of the same outage
  log at DEBUG; a connection that stays up STABLE_CONNECTION_S ends the outage;
* PUBACK tracking: a QoS>0 message not acknowledged within ``ack_timeout_s`` means the link is
  broken: the socket is dropped (no clean DISCONNECT, so the broker still sends our will) and the
  connection is re-established; the owner resends from its spool;
* a broker that refuses our credentials: one ERROR line, :class:`AuthError` in ``last_error`` and
  ``state == "auth_failed"``, next attempt only after ``auth_retry_s``;
* a fresh paho client per connection, so nothing paho queued for a dead connection is ever
  resent behind our back (the spool is the single source of truth for what still has to go).
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

import paho.mqtt.client as paho

from edge.config import MqttConfig
from edge.credentials import credential_path, read_secret, secret_file
from edge.errors import AuthError, BrokerError
from edge.logonce import OncePerKind
from proto.backoff import Backoff
from proto.errors import ConfigError

log = logging.getLogger(__name__)

Message = Tuple[str, bytes, int, bool]  # topic, payload, qos, retain
MessageCallback = Callable[[str, bytes], None]

LOOP_TIMEOUT_S = 0.05  # how long one paho loop() turn may block: the latency of call_soon/pump
STABLE_CONNECTION_S = 10.0  # a connection up this long resets the backoff and ends the outage
AUTH_REFUSED = ("Bad user name or password", "Not authorized", "Bad authentication method")

STATE_IDLE = "idle"
STATE_CONNECTING = "connecting"
STATE_CONNECTED = "connected"
STATE_BACKOFF = "backoff"
STATE_AUTH_FAILED = "auth_failed"
STATE_STOPPED = "stopped"


class MqttClient:
    def __init__(self, cfg: MqttConfig, client_id: str,
                 will: Optional[Callable[[], Optional[Message]]] = None,
                 on_connected: Optional[Callable[[], None]] = None,
                 on_disconnected: Optional[Callable[[bool], None]] = None,
                 pump: Optional[Callable[[], None]] = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._will = will
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._pump = pump
        self.state = STATE_IDLE
        self.last_error: Optional[BrokerError] = None
        self.connect_attempts = 0
        self.connections = 0
        self._subs: Dict[str, Tuple[int, MessageCallback]] = {}
        self._subs_lock = threading.Lock()
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self._pending: Dict[int, Tuple[float, Optional[Callable[[], None]]]] = {}
        self._client: Optional[paho.Client] = None
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._final: Optional[Message] = None
        self._final_timeout = 2.0
        self._auth_refused = False
        self._outage = OncePerKind(log)  # one WARNING per outage (kind "outage"), the rest at DEBUG
        self.next_attempt_at = 0.0  # monotonic time of the next connect attempt while waiting
        self._backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, STABLE_CONNECTION_S)
        self.delays: Deque[float] = self._backoff.history  # recent waits before reconnecting
        self._thread: Optional[threading.Thread] = None
        self._password = read_secret(cfg.password_file) if cfg.password_file else None

    # -- public API (any thread) ------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.host)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Start connecting in the background; never raises because the broker is down."""
        if self._thread is not None or not self.enabled:
            if not self.enabled:
                log.info("mqtt: no [mqtt] host configured: frames stay in the spool")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()

    def stop(self, final: Optional[Message] = None, timeout: float = 2.0) -> None:
        """Publish ``final`` (waiting up to ``timeout`` for its ack) if connected, then DISCONNECT."""
        self._final = final
        self._final_timeout = timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout + 5.0)
            self._thread = None
        self.state = STATE_STOPPED

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the I/O thread (where :meth:`publish_now` may be called); dropped when
        MQTT is disabled (no [mqtt] host)."""
        if self.enabled:
            self._calls.put(fn)

    def subscribe(self, topic: str, callback: MessageCallback, qos: int = 1) -> None:
        """Subscribe now if connected and again after every reconnect."""
        with self._subs_lock:
            self._subs[topic] = (qos, callback)
        self.call_soon(lambda: self._subscribe_now([(topic, qos)]))

    @property
    def inflight(self) -> int:
        return len(self._pending)

    # -- I/O thread only ----------------------------------------------------------------------------

    def publish_now(self, topic: str, payload: bytes, qos: int, retain: bool,
                    on_ack: Optional[Callable[[], None]] = None) -> Optional[int]:
        """Hand a message to the connection; returns its mid or None when not connected.
        ``on_ack`` runs (in the I/O thread) when the broker acknowledged a QoS>0 message."""
        client = self._client
        if client is None or not self._connected.is_set():
            return None
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, OSError) as exc:
            raise BrokerError(f"cannot publish on {topic}: {exc}") from exc
        if info.rc != paho.MQTT_ERR_SUCCESS:
            log.debug("mqtt: publish on %s returned %s", topic, paho.error_string(info.rc))
            if info.rc == paho.MQTT_ERR_NO_CONN:
                return None
        if qos > 0:
            self._pending[info.mid] = (time.monotonic(), on_ack)
        return int(info.mid)

    def _subscribe_now(self, items: List[Tuple[str, int]]) -> None:
        client = self._client
        if client is None or not self._connected.is_set() or not items:
            return
        try:
            client.subscribe(items)
        except ValueError as exc:
            log.error("mqtt: cannot subscribe to %s: %s", [t for t, _ in items], exc)

    def _new_client(self) -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                        protocol=paho.MQTTv311)
        c.connect_timeout = max(1.0, self.cfg.ack_timeout_s)
        c.max_inflight_messages_set(self.cfg.max_inflight + 10)
        c.max_queued_messages_set(0)
        if self.cfg.username:
            c.username_pw_set(self.cfg.username, self._password)
        if self.cfg.tls:
            try:
                c.tls_set(ca_certs=credential_path(self.cfg.ca_file) or None,
                          certfile=credential_path(self.cfg.cert_file) or None,
                          keyfile=(secret_file(self.cfg.key_file) if self.cfg.key_file else None),
                          cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise ConfigError(f"[mqtt] TLS files unusable ({exc}): "
                                  "check ca_file/cert_file/key_file") from exc
        if self._will is not None:
            will = self._will()
            if will is not None:
                topic, payload, qos, retain = will
                c.will_set(topic, payload, qos=qos, retain=retain)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_publish = self._handle_publish
        c.on_message = self._handle_message
        return c

    def _handle_connect(self, client: paho.Client, userdata: object, flags: object, reason: object,
                        properties: object = None) -> None:
        if client is not self._client:
            return
        failed = bool(getattr(reason, "is_failure", False))
        name = reason.getName() if hasattr(reason, "getName") else str(reason)
        if failed:
            where = f"{self.cfg.host}:{self.cfg.port}"
            if name in AUTH_REFUSED:
                self._auth_refused = True
                self.last_error = AuthError(f"broker {where} refused our credentials ({name}) for user "
                                            f"{self.cfg.username!r}")
                log.error("mqtt: broker %s refused our credentials (%s) for user %r: fix [mqtt] username/"
                          "password_file or the broker's password file; next attempt in %.0fs",
                          where, name, self.cfg.username, self.cfg.auth_retry_s)
            else:
                self.last_error = BrokerError(f"broker {where} refused the connection: {name}")
                self._trouble("broker %s refused the connection: %s", where, name)
            return
        self._auth_refused = False
        self.last_error = None
        self.connections += 1
        self.state = STATE_CONNECTED
        self._connected.set()
        log.info("mqtt: connected to %s:%d as %s", self.cfg.host, self.cfg.port, self.client_id)
        with self._subs_lock:
            items = [(t, q) for t, (q, _) in self._subs.items()]
        self._subscribe_now(items)
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:  # never let the owner's bug kill the I/O thread
                log.exception("mqtt: on_connected failed")

    def _handle_disconnect(self, client: paho.Client, userdata: object, flags: object = None,
                           reason: object = None, properties: object = None) -> None:
        if client is self._client:
            self._connected.clear()

    def _handle_publish(self, client: paho.Client, userdata: object, mid: int, reason: object = None,
                        properties: object = None) -> None:
        if client is not self._client:
            return
        entry = self._pending.pop(mid, None)
        if entry is not None and entry[1] is not None:
            try:
                entry[1]()
            except Exception:
                log.exception("mqtt: ack handler failed")

    def _handle_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._subs_lock:
            targets = [cb for t, (_, cb) in self._subs.items() if paho.topic_matches_sub(t, msg.topic)]
        for cb in targets:
            try:
                cb(msg.topic, bytes(msg.payload))
            except Exception:  # a subscriber's bug must not kill the connection
                log.exception("mqtt: callback for %s failed", msg.topic)

    def _run_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception:
                log.exception("mqtt: queued call failed")

    def _trouble(self, msg: str, *args: object) -> None:
        """Log a connection problem: WARNING for the first of an outage, DEBUG for the rest."""
        self._outage.log("outage", logging.WARNING, "mqtt: " + msg, *args)

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self.next_attempt_at = deadline
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, 0.1))
            self._drop_calls_while_offline()

    def _drop_calls_while_offline(self) -> None:
        # Calls made while offline refer to a connection that is gone (publish_now returns None);
        # running them keeps the queue short. Subscriptions are re-made on connect anyway.
        self._run_calls()

    def _ack_overdue(self) -> bool:
        if not self._pending:
            return False
        oldest = min(t for t, _ in self._pending.values())
        return time.monotonic() - oldest > self.cfg.ack_timeout_s

    def _drop_link(self, client: paho.Client) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._connect_loop()
            except Exception:  # the I/O thread must outlive any bug: log, back off, go on
                log.exception("mqtt: I/O thread error; restarting the connection")
                self._client = None
                self._connected.clear()
                self._pending.clear()
                self._wait(self.cfg.reconnect_max_s)
        self.state = STATE_STOPPED

    def _connect_loop(self) -> None:
        backoff = self._backoff
        backoff.reset()
        while not self._stop.is_set():
            self.state = STATE_CONNECTING
            try:
                client = self._new_client()
            except ConfigError as exc:
                self.last_error = BrokerError(str(exc))
                log.error("mqtt: %s", exc)
                self.state = STATE_BACKOFF
                self._wait(self.cfg.auth_retry_s)
                continue
            self._client = client
            self.connect_attempts += 1
            self._auth_refused = False
            try:
                client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
            except (OSError, ValueError) as exc:
                self.last_error = BrokerError(f"cannot reach broker {self.cfg.host}:{self.cfg.port}: {exc}")
                self._trouble("%s (retrying with backoff up to %.0fs; frames are kept in the spool)",
                              self.last_error, self.cfg.reconnect_max_s)
                self._client = None
                self.state = STATE_BACKOFF
                self._wait(backoff.next())
                continue
            was_connected, up_for, peer_closed = self._serve(client)
            self._client = None
            self._connected.clear()
            self._pending.clear()
            if was_connected and self._on_disconnected is not None:
                try:
                    self._on_disconnected(peer_closed)
                except Exception:
                    log.exception("mqtt: on_disconnected failed")
            if self._stop.is_set():
                break
            if self._auth_refused:
                self.state = STATE_AUTH_FAILED
                self._wait(self.cfg.auth_retry_s)
                backoff.reset()
                continue
            if was_connected:
                if up_for >= backoff.stable_s:
                    self._outage.reset()  # that outage is over: this is a new one
                    backoff.reset()
                self._trouble("connection to %s:%d lost after %.1fs; reconnecting with backoff (frames are "
                              "kept in the spool)", self.cfg.host, self.cfg.port, up_for)
            self.state = STATE_BACKOFF
            self._wait(backoff.next())
        self.state = STATE_STOPPED

    def _serve(self, client: paho.Client) -> Tuple[bool, float, bool]:
        """Run one connection until it breaks or we are stopped; (whether it got connected, how
        long it stayed connected in seconds, whether the peer closed it rather than we)."""
        started = time.monotonic()
        was_connected = False
        peer_closed = False
        up_since = started
        while True:
            try:
                rc = client.loop(timeout=LOOP_TIMEOUT_S)
            except Exception as exc:  # paho raises assorted errors on a dying socket
                self._trouble("connection error: %s", exc)
                self._drop_link(client)
                peer_closed = True
                break
            if self._connected.is_set() and not was_connected:
                was_connected = True
                up_since = time.monotonic()
            if was_connected and self._outage.logged() and time.monotonic() - up_since >= STABLE_CONNECTION_S:
                self._outage.reset()
            if rc != paho.MQTT_ERR_SUCCESS or (was_connected and not self._connected.is_set()):
                peer_closed = True
                break
            if self._stop.is_set():
                self._finish(client)
                break
            if not self._connected.is_set():
                if self._auth_refused or time.monotonic() - started > max(1.0, self.cfg.ack_timeout_s):
                    if not self._auth_refused:
                        self._trouble("no CONNACK from %s:%d within %.1fs", self.cfg.host, self.cfg.port,
                                      self.cfg.ack_timeout_s)
                    self._drop_link(client)
                    break
                continue
            self._run_calls()
            if self._pump is not None:
                try:
                    self._pump()
                except Exception:
                    log.exception("mqtt: pump failed")
            if self._ack_overdue():
                self._trouble("no PUBACK within %.1fs: treating the link as broken, reconnecting and "
                              "resending from the spool", self.cfg.ack_timeout_s)
                self._drop_link(client)
                break  # we dropped it: the broker did not refuse what was in flight
        return was_connected, (time.monotonic() - up_since if was_connected else 0.0), peer_closed

    def _finish(self, client: paho.Client) -> None:
        """Clean shutdown on a live connection: final message (acked, bounded), then DISCONNECT."""
        if not self._connected.is_set():
            self._drop_link(client)
            return
        self._run_calls()
        acked = threading.Event()
        if self._final is not None:
            topic, payload, qos, retain = self._final
            mid = self.publish_now(topic, payload, qos, retain, on_ack=acked.set)
            if mid is None or qos == 0:
                acked.set()
            deadline = time.monotonic() + self._final_timeout
            while not acked.is_set() and time.monotonic() < deadline and self._connected.is_set():
                if client.loop(timeout=LOOP_TIMEOUT_S) != paho.MQTT_ERR_SUCCESS:
                    break
        client.disconnect()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if client.loop(timeout=LOOP_TIMEOUT_S) != paho.MQTT_ERR_SUCCESS:
                break
        self._drop_link(client)
        log.info("mqtt: disconnected from %s:%d", self.cfg.host, self.cfg.port)
