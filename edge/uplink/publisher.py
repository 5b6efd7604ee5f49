"""The edge daemon's MQTT publisher: frames through the durable spool, telemetry, status.

* :meth:`Publisher.publish_frame` assigns ``frame.sequence`` (monotonic, persisted), writes the
  encoded frame to the spool (fsync per ``[spool] fsync``) BEFORE returning; the I/O thread then
  sends spooled frames in sequence order at QoS 1 on ``topics.frames(device_id)``, at most
  ``[mqtt] max_inflight`` unacknowledged at once (the PUBACK paces the wire).
* **When a frame leaves the spool** (``[mqtt] delete_on``, edge.uplink.receipts,
  docs/adr/0019-storage-receipts.md): with the hub's storage receipts, only when a ``Receipt`` names
  it (it is durable in the hub's store); a frame the broker acknowledged and no receipt named within
  ``receipt_timeout_s`` (doubling per resend) is published again, at once when the hub asks
  (``ResendRequest``: its broker session was lost); a frame the hub refused for good is set aside in
  ``{spool}/dead/``. Without receipts (``puback``, or ``auto`` with no hub announcing them) a frame
  leaves on its PUBACK.
* After a reconnect every frame the broker did not acknowledge is sent again from the oldest: the
  transport is *at least once* (a frame whose PUBACK or receipt was lost is sent again; the hub stores
  frames idempotently on ``frame_id``), without loss.
* A frame the broker keeps refusing (it closes the connection while that frame is in flight, e.g.
  over its ``max_packet_size``) must not block the frames behind it: the oldest frame in flight when
  the broker or the network closes a connection (not when we close it: stop, missing PUBACK) is
  *suspect* and is sent alone on the next connection; after ``[mqtt] max_send_attempts`` such
  connections it is set aside in ``{spool}/dead/`` (kept, one ERROR line, counted in
  ``dead_letters``) and the next frames go out.
* A spool write that fails (disk full, read-only) is logged once per outage (ERROR), counted in
  ``spool_write_failed``; ``publish_frame`` then returns False.
* Status: retained QoS 1 on ``topics.status(device_id)``; birth ``online`` after every connect,
  last will ``offline`` (both built by the status provider), an explicit retained ``offline`` on
  :meth:`stop`.
* Telemetry: QoS 0, best effort; while disconnected it is dropped and counted.

See docs/edge-transport.md.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from edge.config import MqttConfig, SpoolConfig
from edge.errors import FrameError, OversizeFrame, StorageError
from edge.logonce import OncePerKind
from edge.uplink.mqtt import Message, MessageCallback, MqttClient
from edge.uplink.receipts import Receipts
from edge.uplink.spool import Spool
from proto import kestrel_pb2, topics
from proto.clock import now_ms

log = logging.getLogger(__name__)

StatusProvider = Callable[[str], kestrel_pb2.Status]


def frame_id_of(payload: bytes) -> str:
    """The frame id of an encoded Frame (names an older daemon's spool records, which carry no key)."""
    return str(kestrel_pb2.Frame.FromString(payload).frame_id)


class Publisher:
    def __init__(self, mqtt: MqttConfig, spool: SpoolConfig, device_id: str, group: str, spool_dir: Path) -> None:
        self.mqtt_cfg = mqtt
        self.device_id = device_id
        self.group = group
        self.spool = Spool(Path(spool_dir), spool.max_bytes, spool.max_frames, fsync=spool.fsync,
                           max_dead=spool.max_dead_letters, key_of=frame_id_of)
        self._frames_topic = topics.frames(device_id)
        self._status_topic = topics.status(device_id)
        self._telemetry_topic = topics.telemetry(device_id)
        self._provider: Optional[StatusProvider] = None
        self._last_status: Optional[kestrel_pb2.Status] = None
        self._cond = threading.Condition()
        # I/O-thread state: seq -> mid of frames sent on this connection, and the last seq sent.
        self._inflight: Dict[int, int] = {}
        self._cursor: Optional[int] = None
        # seq -> connections that broke while it was the oldest unacknowledged frame in flight
        self._suspects: Dict[int, int] = {}
        self._write_failing = OncePerKind(log)  # one ERROR line per outage of the spool
        self.frames_sent = 0
        self.frames_acked = 0
        self.oversize_refused = 0
        self.spool_write_failed = 0
        self.last_ack_at = 0.0  # monotonic time of the last frame PUBACK
        self.telemetry_dropped = 0
        self.telemetry_sent = 0
        self.receipts = Receipts(mqtt, device_id, self.spool, self._notify,
                                 lambda seq: self._suspects.pop(seq, None))
        self._mqtt = MqttClient(mqtt, f"kestrel-edge-{device_id}", will=self._will,
                                on_connected=self._on_connected, on_disconnected=self._on_disconnected,
                                pump=self._pump)
        for topic, callback, qos in self.receipts.subscriptions():  # made before the birth on every connection
            self._mqtt.subscribe(topic, callback, qos)

    # -- status ---------------------------------------------------------------------------------

    def set_status_provider(self, fn: StatusProvider) -> None:
        self._provider = fn

    def status_message(self, state: str) -> kestrel_pb2.Status:
        """The device's Status as the status provider (the daemon) builds it; a minimal one without one."""
        return self._status(state)

    def _status(self, state: str) -> kestrel_pb2.Status:
        if self._provider is not None:
            try:
                msg = self._provider(state)
                msg.state = state
                return msg
            except Exception:
                log.exception("publisher: status provider failed; sending a minimal status")
        return kestrel_pb2.Status(device_id=self.device_id, state=state, time_ms=now_ms(),
                                  group=self.group)

    def _will(self) -> Optional[Message]:
        offline = self._status(topics.STATE_OFFLINE).SerializeToString()
        return (self._status_topic, offline, topics.QOS_STATUS, True)

    def publish_status(self, msg: kestrel_pb2.Status) -> None:
        """Retained QoS 1; remembered and re-sent after every reconnect."""
        self._last_status = msg
        payload = msg.SerializeToString()
        self._mqtt.call_soon(lambda: self._send_status(payload))

    def _send_status(self, payload: bytes) -> None:
        self._mqtt.publish_now(self._status_topic, payload, topics.QOS_STATUS, True)

    # -- telemetry ------------------------------------------------------------------------------

    def publish_telemetry(self, msg: kestrel_pb2.Telemetry) -> None:
        """QoS 0, best effort: counted in ``telemetry_dropped`` when it cannot be sent."""
        if not self._mqtt.connected:
            self.telemetry_dropped += 1
            return
        payload = msg.SerializeToString()

        def send() -> None:
            if self._mqtt.publish_now(self._telemetry_topic, payload, topics.QOS_TELEMETRY, False) is None:
                self.telemetry_dropped += 1
            else:
                self.telemetry_sent += 1

        self._mqtt.call_soon(send)

    # -- frames ---------------------------------------------------------------------------------

    def publish_frame(self, frame: kestrel_pb2.Frame) -> bool:
        """Assign ``frame.sequence`` and store the frame durably; it is sent in order in the background.
        True when the frame is in the spool.

        A frame whose encoded message exceeds ``[mqtt] max_payload_bytes`` is refused (one ERROR line,
        counted in ``oversize_refused``) and consumes no sequence number. A spool write that fails is
        counted in ``spool_write_failed`` and logged once until a write succeeds again.
        """
        limit = self.mqtt_cfg.max_payload_bytes

        def encode(seq: int) -> bytes:
            frame.sequence = seq
            if not frame.image_bytes and frame.image:
                frame.image_bytes = len(frame.image)
            data = frame.SerializeToString()
            if len(data) > limit:
                raise OversizeFrame(f"frame {frame.frame_id!r} encodes to {len(data)} bytes, over [mqtt] "
                                f"max_payload_bytes={limit}: not sent (re-encode it smaller)")
            return data

        try:
            self.spool.append(encode, key=frame.frame_id)
        except OversizeFrame as exc:
            self.oversize_refused += 1
            frame.sequence = 0
            log.error("publisher: %s", exc)
            return False
        except FrameError as exc:
            self.oversize_refused += 1
            frame.sequence = 0
            log.error("publisher: frame %r refused: %s", frame.frame_id, exc)
            return False
        except StorageError as exc:
            self.spool_write_failed += 1
            frame.sequence = 0
            self._write_failing.log("spool write", logging.ERROR, "publisher: %s; sampled frames are counted and "
                                    "dropped until the spool can be written again (free space in %s)", exc,
                                    self.spool.dir)
            return False
        if self._write_failing.logged():
            self._write_failing.reset()
            log.info("publisher: the spool is writable again (%d frames could not be stored)",
                     self.spool_write_failed)
        return True

    def _pump(self) -> None:
        """I/O thread: send what is due while the in-flight window has room: frames whose receipt is
        overdue first (oldest first), then spooled frames after the cursor that no connection got a
        PUBACK for. A suspect frame (see the module doc) is sent alone: nothing else until it is
        acknowledged."""
        if self._suspects and self._inflight and min(self._inflight) in self._suspects:
            return
        room = self.mqtt_cfg.max_inflight - len(self._inflight)
        if room <= 0:
            return
        for seq, payload in self.receipts.due(room):
            if not self._send(seq, payload):
                return
            self.receipts.resending(seq)
            room -= 1
        if room <= 0:
            return
        records, last = self.spool.scan(self._cursor, room, skip=self._held)
        for seq, payload in records:
            if seq in self._suspects and self._inflight:
                return  # wait until the window is empty, then send the suspect alone
            if not self._send(seq, payload):
                return
            self._cursor = seq
            if seq in self._suspects:
                return
        if not records:
            self._cursor = last

    def _held(self, seq: int) -> bool:
        """In flight, or acknowledged and waiting for its receipt (sent again by the receipt side)."""
        return seq in self._inflight or self.receipts.held(seq)

    def _send(self, seq: int, payload: bytes) -> bool:
        mid = self._mqtt.publish_now(self._frames_topic, payload, topics.QOS_FRAMES, False,
                                     on_ack=functools.partial(self._acked, seq))
        if mid is None:
            return False
        self._inflight[seq] = mid
        self.frames_sent += 1
        return True

    def _acked(self, seq: int) -> None:
        self.last_ack_at = time.monotonic()
        self._inflight.pop(seq, None)
        self._suspects.pop(seq, None)
        self.receipts.acked(seq)  # deleted now (puback) or kept until the hub's receipt
        self.frames_acked += 1
        self._notify()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_connected(self) -> None:
        self._inflight.clear()
        self._cursor = None  # resend everything the broker did not acknowledge, oldest first
        self.receipts.connected()
        birth = self._status(topics.STATE_ONLINE) if self._provider is not None else self._last_status
        if birth is None:
            birth = self._status(topics.STATE_ONLINE)
        # behind this connection's subscriptions: its PUBACK comes after any retained announcement
        self._mqtt.publish_now(self._status_topic, birth.SerializeToString(), topics.QOS_STATUS, True,
                               on_ack=self.receipts.birth_acked)
        self._notify()

    def _on_disconnected(self, peer_closed: bool) -> None:
        # only a link the broker (or the network) closed can mean it refused the frame; our own
        # stop() or our drop on a missing PUBACK says nothing about it
        if peer_closed and self._inflight:
            self._blame(min(self._inflight))
        self._inflight.clear()
        self._cursor = None
        self.receipts.link_lost()
        self._notify()

    def _blame(self, seq: int) -> None:
        """The connection broke while ``seq`` was the oldest frame in flight."""
        n = self._suspects.get(seq, 0) + 1
        limit = self.mqtt_cfg.max_send_attempts
        if n < limit:
            self._suspects[seq] = n
            return
        self._suspects.pop(seq, None)
        where = self.spool.set_aside(seq)
        if where is None:
            return
        log.error("publisher: frame seq=%d was in flight each time the broker closed the connection (%d "
                  "connections, the last %d with nothing else in flight): set aside as %s so the frames "
                  "behind it can go (check the broker's max_packet_size and ACLs; %d set aside so far)",
                  seq, n, n - 1, where, self.dead_letters)

    # -- lifecycle ------------------------------------------------------------------------------

    def subscribe(self, topic: str, callback: MessageCallback, qos: int = 1) -> None:
        """``callback(topic, payload)`` runs in the I/O thread (keep it short); re-subscribed on reconnect."""
        self._mqtt.subscribe(topic, callback, qos)

    def start(self) -> None:
        """Connect in the background; never raises because the broker is down."""
        self._mqtt.start()

    def flush(self, timeout_s: float) -> bool:
        """Wait (bounded) until the spool is empty while connected; True if it is empty."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.spool) and self._mqtt.connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
        return len(self.spool) == 0

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Drain the spool (bounded), publish retained ``offline``, disconnect cleanly.
        Whatever is unsent stays in the spool for the next start."""
        self.flush(flush_timeout_s)
        offline = self._status(topics.STATE_OFFLINE).SerializeToString()
        self._mqtt.stop(final=(self._status_topic, offline, topics.QOS_STATUS, True),
                        timeout=min(2.0, max(0.5, self.mqtt_cfg.ack_timeout_s)))
        left = len(self.spool)
        if left:
            log.info("publisher: %d frames stay in the spool for the next start", left)

    # -- state ----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._mqtt.connected

    @property
    def state(self) -> str:
        return self._mqtt.state

    @property
    def last_error(self) -> Optional[Exception]:
        return self._mqtt.last_error

    @property
    def mqtt(self) -> MqttClient:
        return self._mqtt

    @property
    def dead_letters(self) -> int:
        """Frames set aside in ``{spool}/dead/``, ever (persisted: it survives restarts and an operator
        moving files out of dead/)."""
        return self.spool.dead_lettered

    def spool_stats(self) -> Tuple[int, int, int]:
        """(bytes, frames, evictions) of the spool."""
        return self.spool.stats()
