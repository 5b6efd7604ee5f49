"""One simulated device of the load generator: its own MQTT connection and the device side of storage receipts.

Like the edge daemon (edge/uplink, docs/edge-transport.md) and unlike a bare publisher:

* MQTT 3.1.1, QoS 1 frames on ``kestrel/v1/devices/{id}/frames``, TLS with the device's own certificate or a
  username and password when the broker asks for them (an identity of ``kestrel-hub devices add``);
* reconnects wait as proto.backoff says (``reconnect_min_s`` doubling up to ``reconnect_max_s``), paho resends
  what the broker had not acknowledged and the frames published meanwhile wait in paho's queue;
* a frame is done only when a hub's ``Receipt`` names it (``receipts = False``: on the broker's PUBACK, for
  hubs that send none). A frame the broker acknowledged and no receipt named within ``receipt_timeout_s`` is
  published again, the wait doubling per resend up to ``receipt_timeout_max_s``; a hub's ``ResendRequest``
  (its session was lost, or a share-group worker's last will) makes every such frame due at once. A frame
  the hub refused for good is done too (counted as refused).

Every frame done is handed to ``record`` once: (device index, seq, first publish time [s], sends, committed_ms
[hub clock; 0 without receipts], time the receipt or PUBACK arrived [s], hub id, refused reason). Callbacks
run on the device's paho thread; ``publish`` and ``sweep`` on the runner's thread; the state between them is
under one lock, never held while calling paho (paho calls ``on_publish`` under its own lock).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import paho.mqtt.client as mqtt

from hub.loadgen import frames
from proto import kestrel_pb2, topics
from proto.backoff import Backoff

log = logging.getLogger("hub.loadgen")

STABLE_CONNECTION_S = 10.0  # as the devices: the backoff starts from its minimum after a connection stayed up
MAX_INFLIGHT = 20           # QoS 1 frames on the wire before paho waits for PUBACKs (the edge's default)

Record = Tuple[int, int, float, int, int, float, str, str]


@dataclasses.dataclass
class Credentials:
    """How a device logs in: TLS (``ca_file``; a client certificate with ``cert_file``/``key_file``) and/or a
    username and password."""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)


@dataclasses.dataclass
class DeviceSettings:
    host: str
    port: int
    run_id: str
    receipts: bool = True
    receipt_timeout_s: float = 60.0
    receipt_timeout_max_s: float = 900.0
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 10.0
    keepalive_s: int = 30


@dataclasses.dataclass
class Pending:
    capture_ms: int
    first_s: float
    sends: int = 1
    acked: bool = False
    token: int = 0  # which send the due entry belongs to (a resend or a receipt makes older entries stale)


class SimDevice:
    def __init__(self, index: int, device_id: str, settings: DeviceSettings, creds: Credentials,
                 images: List[Tuple[bytes, int, int]], record: Callable[[Record], None]) -> None:
        self.index = index
        self.device_id = device_id
        self.s = settings
        self.images = images
        self.record = record
        self.topic = topics.frames(device_id)
        self.prefix = frames.frame_id(settings.run_id, device_id, 0)[:-1]  # "<run>-<device>-"
        self._lock = threading.Lock()
        self.pending: Dict[int, Pending] = {}
        self._by_mid: Dict[int, int] = {}
        self._early: Set[int] = set()  # PUBACKs that came before publish() told us their mid
        self._due: List[Tuple[float, int, int]] = []  # (due time, seq, token), a heap
        self.sent = 0
        self.resent = 0
        self.done = 0
        self.refused = 0
        self.receipts = 0  # Receipt messages for this device
        self.resend_requests = 0
        self.connects = 0
        self.refusal: Optional[str] = None  # the broker refused the CONNECT: why
        self.closed_early = 0  # connections the broker closed before any CONNACK (a TLS or login refusal)
        self.connected = threading.Event()
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s, STABLE_CONNECTION_S)
        self.client = self._make_client(creds)

    # ---- the connection ----
    def _make_client(self, creds: Credentials) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.device_id}-{self.s.run_id}",
                        clean_session=True, protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.max_queued_messages_set(0)  # frames published while disconnected wait (the edge's spool does that)
        self._set_delay(c, self.s.reconnect_min_s)
        if creds.username:
            c.username_pw_set(creds.username, creds.password or None)
        if creds.tls:
            c.tls_set(ca_certs=creds.ca_file or None, certfile=creds.cert_file or None,
                      keyfile=creds.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    @staticmethod
    def _set_delay(client: mqtt.Client, wait: float) -> None:
        client.reconnect_delay_set(wait, wait)  # type: ignore[arg-type]  # paho then waits exactly this long

    def start(self) -> None:
        """Connect (the first attempt here: a refused TCP or TLS connection raises OSError/ssl.SSLError), then
        paho's thread keeps the connection."""
        self.client.connect(self.s.host, self.s.port, keepalive=self.s.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            self.refusal = str(reason)
            return
        self.connects += 1
        self.backoff.up()
        subs = [(topics.HUB_RESEND, topics.QOS_HUB)]
        if self.s.receipts:
            subs.append((topics.receipts(self.device_id), topics.QOS_RECEIPTS))
        client.subscribe(subs)
        self.connected.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._set_delay(client, self.backoff.next())

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if not self.connects:
            self.closed_early += 1
        self.connected.clear()
        self.backoff.stable()
        self._set_delay(client, self.backoff.next())

    # ---- frames out ----
    def publish(self, seq: int, now: float) -> None:
        """The first send of frame ``seq`` (the runner's thread)."""
        capture_ms = int(now * 1000)
        with self._lock:
            self.pending[seq] = Pending(capture_ms, now)
            self.sent += 1
        self._send(seq, capture_ms)

    def _send(self, seq: int, capture_ms: int) -> None:
        data = frames.payload(self.s.run_id, self.device_id, seq, capture_ms, self.images[seq % len(self.images)])
        info = self.client.publish(self.topic, data, qos=topics.QOS_FRAMES)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._acked(seq, time.time())
            else:
                self._by_mid[info.mid] = seq

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any = None, props: Any = None) -> None:
        now = time.time()
        with self._lock:
            seq = self._by_mid.pop(mid, None)
            if seq is None:
                self._early.add(mid)
            else:
                self._acked(seq, now)

    def _acked(self, seq: int, now: float) -> None:
        """The broker has frame ``seq`` (under the lock): without receipts it is done, else its receipt is due."""
        p = self.pending.get(seq)
        if p is None or p.acked:
            return
        if not self.s.receipts:
            del self.pending[seq]
            self._done(seq, p, 0, now, "", "")
            return
        p.acked = True
        wait = min(self.s.receipt_timeout_s * 2 ** (p.sends - 1), self.s.receipt_timeout_max_s)
        heapq.heappush(self._due, (now + wait, seq, p.token))

    def sweep(self, now: float) -> int:
        """Publish again every frame whose receipt is overdue (the runner's thread); how many."""
        again: List[Tuple[int, int]] = []
        with self._lock:
            while self._due and self._due[0][0] <= now:
                _, seq, token = heapq.heappop(self._due)
                p = self.pending.get(seq)
                if p is None or p.token != token or not p.acked:
                    continue  # receipted, or sent again since
                p.sends += 1
                p.token += 1
                p.acked = False
                self.resent += 1
                again.append((seq, p.capture_ms))
        for seq, capture_ms in again:
            self._send(seq, capture_ms)
        return len(again)

    # ---- receipts and resend requests in ----
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if msg.topic == topics.HUB_RESEND:
            self._resend_all(now)
            return
        r = kestrel_pb2.Receipt()
        try:
            r.ParseFromString(bytes(msg.payload))
        except Exception:  # noqa: BLE001 - DecodeError: someone else's bytes; the timeout covers us
            return
        with self._lock:
            self.receipts += 1
            for fid in r.frame_ids:
                self._receipted(frames.seq_of(fid, self.prefix), r, now, "")
            for refused in r.refused:
                self._receipted(frames.seq_of(refused.frame_id, self.prefix), r, now, refused.reason or "refused")

    def _receipted(self, seq: int, r: kestrel_pb2.Receipt, now: float, refused: str) -> None:
        p = self.pending.pop(seq, None)
        if p is not None:  # else: another run's frame, or receipted before (a resend's second receipt)
            self._done(seq, p, int(r.committed_ms), now, r.hub_id, refused)

    def _done(self, seq: int, p: Pending, committed_ms: int, now: float, hub_id: str, refused: str) -> None:
        self.done += 1
        if refused:
            self.refused += 1
        self.record((self.index, seq, p.first_s, p.sends, committed_ms, now, hub_id, refused))

    def _resend_all(self, now: float) -> None:
        """A hub asked: every frame the broker acknowledged and no receipt named is due now."""
        with self._lock:
            self.resend_requests += 1
            for seq, p in self.pending.items():
                if p.acked:
                    heapq.heappush(self._due, (now, seq, p.token))

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self.pending)
