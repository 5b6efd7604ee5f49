"""MQTT ingest: frames, telemetry and status from the devices into the store.

Guarantees (docs/hub.md):

* Frames arrive on the shared subscription ``$share/<group>/kestrel/v1/devices/+/frames`` (QoS 1),
  so several hub processes split them. The session is persistent (MQTT 3.1.1, clean_session=False,
  fixed client id): the broker queues this hub's share while it is down and resends what was
  delivered but not acknowledged.
* A message is acknowledged (PUBACK) only after the store committed it. paho runs in manual-ack
  mode; ``on_message`` only enqueues, one worker thread validates, commits a batch, then acks the
  batch in arrival order.
* Storage is idempotent on frame_id: a redelivery never creates a second record.
* Bad payloads are counted per reason, logged (rate-limited) and acknowledged: redelivery cannot
  fix them, and they never stop the ingest.
* StoreUnavailable: the worker keeps the batch, acknowledges nothing, and retries with
  exponential backoff (``paused`` in /healthz) until the store answers.
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from edge import topics
from hub.broker import BrokerTarget
from hub.config import MqttSection
from hub.errors import PayloadRejected, StoreError, StoreUnavailable
from hub.store.base import FrameRecord, Store
from proto import kestrel_pb2

log = logging.getLogger("hub.ingest")

REJECT_LOG_INTERVAL_S = 10.0
LAST_SEEN_WRITE_INTERVAL_MS = 1000
QUEUE_POLL_S = 0.2
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 10.0

REASONS = ("too_large", "bad_topic", "bad_protobuf", "device_mismatch", "missing_frame_id", "bad_image",
           "unknown_device", "store_error")


_REASON_NAMES: Dict[int, str] = {v: k for k, v in kestrel_pb2.SampleReason.items()}


def now_ms() -> int:
    return int(time.time() * 1000)


def header_dims(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a JPEG SOF or PNG IHDR header without decoding; None when not found."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7):
            i += 2
            continue
        seg = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + seg
    return None


def check_image(data: bytes, image_format: str) -> Tuple[int, int]:
    """Decode the image (JPEG at 1/8 scale: every entropy-coded block is still read, which is what
    finds corruption, at a fraction of the cost) and return its (width, height); PayloadRejected
    (bad_image) when it does not decode."""
    dims = header_dims(data)
    flags = cv2.IMREAD_REDUCED_GRAYSCALE_8 if dims is not None and data[:2] == b"\xff\xd8" \
        else cv2.IMREAD_UNCHANGED
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if img is None or img.size == 0 or (dims is not None and (dims[0] == 0 or dims[1] == 0)):
        raise PayloadRejected("bad_image",
                              f"image ({len(data)} bytes, {image_format or '?'}) does not decode")
    if dims is None:
        dims = (int(img.shape[1]), int(img.shape[0]))
    return dims


def validate_frame(topic_device: str, payload: bytes, max_bytes: int, received_ms: int) -> FrameRecord:
    """Parse and check one frame message; PayloadRejected(reason, message) when it is bad."""
    if len(payload) > max_bytes:
        raise PayloadRejected("too_large", f"{len(payload)} bytes > max_payload_bytes {max_bytes}")
    msg = kestrel_pb2.Frame()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, ValueError) as exc:
        raise PayloadRejected("bad_protobuf", f"not a kestrel.v1.Frame: {exc}") from exc
    if not msg.frame_id:
        raise PayloadRejected("missing_frame_id", "frame_id is empty")
    if msg.device_id != topic_device:
        raise PayloadRejected("device_mismatch",
                              f"device_id {msg.device_id!r} in the message, {topic_device!r} in the topic")
    if not msg.image:
        raise PayloadRejected("bad_image", "no image")
    width, height = check_image(msg.image, msg.image_format)
    return FrameRecord(
        frame_id=msg.frame_id, device_id=msg.device_id, capture_time_ms=int(msg.capture_time_ms),
        received_ms=received_ms, model_name=msg.model.name, model_version=int(msg.model.version),
        model_sha256=msg.model.sha256,
        reasons=[_REASON_NAMES.get(r) or str(r) for r in msg.reasons],
        top_k=[{"index": int(t.index), "label": t.label, "score": float(t.score)} for t in msg.top_k],
        image=bytes(msg.image), image_format=msg.image_format or "jpeg", width=width, height=height,
        source=msg.source, sequence=int(msg.sequence))


def status_fields(msg: kestrel_pb2.Status, received_ms: int) -> Dict[str, object]:
    """Device-record fields from a Status message (VersionManifest included)."""
    out: Dict[str, object] = {"state": msg.state or "unknown",
                              "last_seen_ms": int(msg.time_ms or received_ms)}
    if msg.group:
        out["group"] = msg.group
    installed = msg.versions.installed if msg.HasField("versions") and msg.versions.HasField("installed") \
        else msg.model
    if installed.name:
        out.update(reported_model=installed.name, reported_version=int(installed.version),
                   reported_sha256=installed.sha256)
    if msg.HasField("versions"):
        out.update(update_state=msg.versions.update_state, update_reason=msg.versions.reason,
                   previous_version=int(msg.versions.previous.version))
    return out


Validated = Union[FrameRecord, PayloadRejected, None]  # None: not a frames topic


@dataclass
class Message:
    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int
    received_ms: int


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    telemetry: int = 0
    status: int = 0
    acked: int = 0
    store_retries: int = 0
    paused: bool = False
    connected: bool = False
    last_store_error: str = ""
    rejected: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})

    def snapshot(self) -> Dict[str, Any]:
        return {"received": self.received, "stored": self.stored, "duplicates": self.duplicates,
                "telemetry": self.telemetry, "status": self.status, "acked": self.acked,
                "store_retries": self.store_retries, "paused": self.paused, "connected": self.connected,
                "last_store_error": self.last_store_error, "rejected": dict(self.rejected)}


class Ingest:
    """Subscribe, validate, store, then acknowledge. ``start()`` returns at once (connects in background)."""

    def __init__(self, store: Store, target: BrokerTarget, cfg: MqttSection, client_id: str,
                 on_stored: Optional[Callable[[List[FrameRecord]], None]] = None) -> None:
        self.store = store
        self.target = target
        self.cfg = cfg
        self.client_id = client_id
        self.on_stored = on_stored
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._generation = 0
        self._known: Set[str] = set()
        self._last_seen_written: Dict[str, int] = {}
        self._reject_log: Dict[str, Tuple[float, int]] = {}
        self._subscribed = threading.Event()
        self._threads: List[threading.Thread] = []
        # validated batches waiting for the commit thread (bounded: validation runs at most 2 ahead)
        self._prepared: queue.Queue[Tuple[List[Message], List[Validated]]] = queue.Queue(maxsize=2)
        workers = cfg.validate_workers or min(4, os.cpu_count() or 1)
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ingest-validate") \
            if workers > 1 else None
        self.client = self._make_client()

    # ---- MQTT ----
    def _make_client(self) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
        c.manual_ack_set(True)
        c.max_inflight_messages_set(100)
        c.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        if self.target.username:
            c.username_pw_set(self.target.username, self.target.password or None)
        if self.target.tls:
            c.tls_set(ca_certs=self.target.ca_file or None, certfile=self.target.cert_file or None,
                      keyfile=self.target.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = lambda *a, **k: self._subscribed.set()
        return c

    def subscriptions(self) -> List[Tuple[str, int]]:
        g = self.cfg.share_group
        frames = topics.shared(g, topics.ALL_FRAMES) if g else topics.ALL_FRAMES
        tele = topics.shared(g, topics.ALL_TELEMETRY) if g else topics.ALL_TELEMETRY
        # status is not shared: retained messages are not sent to shared subscriptions, and every
        # hub applying the same status is harmless (idempotent upsert).
        return [(frames, topics.QOS_FRAMES), (tele, topics.QOS_TELEMETRY),
                (topics.ALL_STATUS, topics.QOS_STATUS)]

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker %s:%d refused the connection: %s", self.target.host, self.target.port, reason)
            return
        with self._lock:
            self._generation += 1
            self.stats.connected = True
        log.info("connected to %s:%d as %s (session present: %s)", self.target.host, self.target.port,
                 self.client_id, getattr(flags, "session_present", "?"))
        client.subscribe(self.subscriptions())

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       props: Any = None) -> None:
        with self._lock:
            self.stats.connected = False
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            gen = self._generation
        self._queue.put(Message(msg.mid, msg.qos, msg.topic, bytes(msg.payload), gen, now_ms()))

    # ---- lifecycle ----
    def start(self) -> Ingest:
        self._threads = [threading.Thread(target=self._validate_loop, name="ingest-validate", daemon=True),
                         threading.Thread(target=self._commit_loop, name="ingest-commit", daemon=True)]
        for t in self._threads:
            t.start()
        self.client.connect_async(self.target.host, self.target.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        return self

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self.client.disconnect()
        self.client.loop_stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def health(self) -> Dict[str, Any]:
        with self._lock:
            return self.stats.snapshot()

    # ---- worker ----
    # Two stages so image decoding (validate) overlaps the store commit; both release the GIL.
    def _validate_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.cfg.batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            item = (batch, self._validate_frames(batch))
            while not self._stop.is_set():
                try:
                    self._prepared.put(item, timeout=QUEUE_POLL_S)
                    break
                except queue.Full:
                    continue

    def _commit_loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch, validated = self._prepared.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                continue
            self._process_with_retry(batch, validated)

    def _process_with_retry(self, batch: List[Message], validated: List[Validated]) -> None:
        delay = self.cfg.retry_initial_s
        while True:
            try:
                self._process(batch, validated)
                if self.stats.paused:
                    log.info("store is back; ingest resumed")
                with self._lock:
                    self.stats.paused = False
                return
            except StoreUnavailable as exc:
                with self._lock:
                    first = not self.stats.paused
                    self.stats.paused = True
                    self.stats.store_retries += 1
                    self.stats.last_store_error = str(exc)
                if first:
                    log.error("store unavailable, ingest paused (nothing acknowledged): %s", exc)
                if self._stop.wait(delay):
                    return  # shutting down: unacknowledged messages stay with the broker
                delay = min(delay * 2, self.cfg.retry_max_s)

    def _reject(self, m: Message, exc: PayloadRejected) -> None:
        """Count and (rate-limited) log one rejection; called only once the batch is committed."""
        with self._lock:
            self.stats.rejected[exc.reason] = self.stats.rejected.get(exc.reason, 0) + 1
        last, suppressed = self._reject_log.get(exc.reason, (0.0, 0))
        t = time.monotonic()
        if t - last >= REJECT_LOG_INTERVAL_S:
            more = f" (+{suppressed} more since last report)" if suppressed else ""
            log.warning("rejected payload on %s: %s%s", m.topic, exc, more)
            self._reject_log[exc.reason] = (t, 0)
        else:
            self._reject_log[exc.reason] = (last, suppressed + 1)

    def _check_device(self, device_id: str) -> None:
        """Auto-register (or refuse) a device the first time it is seen. May raise StoreUnavailable."""
        if device_id in self._known:
            return
        if self.store.get_device(device_id) is None:
            if not self.cfg.allow_unknown_devices:
                raise PayloadRejected("unknown_device", f"device {device_id!r} is not registered "
                                                        "(allow_unknown_devices = false)")
            self.store.upsert_device(device_id, last_seen_ms=now_ms())
            log.info("auto-registered device %s", device_id)
        self._known.add(device_id)

    def _process(self, batch: List[Message], validated: List[Validated]) -> None:
        """Validate, commit, then count and acknowledge. Safe to re-run after StoreUnavailable:
        nothing is counted or acknowledged before every store write of the batch succeeded."""
        rejected: List[Tuple[Message, PayloadRejected]] = []
        frames: List[FrameRecord] = []
        device_updates: List[Tuple[str, Dict[str, object]]] = []
        n_tele = n_status = 0
        for i, m in enumerate(batch):
            try:
                device_id, kind = topics.parse_device_topic(m.topic)
            except ValueError as exc:
                rejected.append((m, PayloadRejected("bad_topic", str(exc))))
                continue
            try:
                if kind == "frames":
                    rec = validated[i]
                    if isinstance(rec, PayloadRejected):
                        raise rec
                    assert rec is not None  # a frames topic always has a validation result
                    self._check_device(device_id)
                    frames.append(rec)
                elif kind == "telemetry":
                    tmsg = kestrel_pb2.Telemetry()
                    try:
                        tmsg.ParseFromString(m.payload)
                    except (DecodeError, ValueError) as exc:
                        raise PayloadRejected("bad_protobuf", f"not a kestrel.v1.Telemetry: {exc}") from exc
                    if tmsg.device_id and tmsg.device_id != device_id:
                        raise PayloadRejected("device_mismatch", f"telemetry for {tmsg.device_id!r} on "
                                                                 f"{device_id!r}'s topic")
                    self._check_device(device_id)
                    device_updates.append((device_id, {
                        "last_telemetry": json_format.MessageToDict(tmsg, preserving_proto_field_name=True),
                        "last_seen_ms": int(tmsg.time_ms or m.received_ms)}))
                    n_tele += 1
                elif kind == "status":
                    if not m.payload:  # a cleared retained status
                        continue
                    smsg = kestrel_pb2.Status()
                    try:
                        smsg.ParseFromString(m.payload)
                    except (DecodeError, ValueError) as exc:
                        raise PayloadRejected("bad_protobuf", f"not a kestrel.v1.Status: {exc}") from exc
                    if smsg.device_id and smsg.device_id != device_id:
                        raise PayloadRejected("device_mismatch", f"status for {smsg.device_id!r} on "
                                                                 f"{device_id!r}'s topic")
                    self._check_device(device_id)
                    device_updates.append((device_id, status_fields(smsg, m.received_ms)))
                    n_status += 1
                else:
                    raise PayloadRejected("bad_topic", f"unexpected topic kind {kind!r}")
            except PayloadRejected as exc:
                rejected.append((m, exc))
        results = self._store_frames(frames)
        for device_id, fields_ in device_updates:
            self.store.upsert_device(device_id, **fields_)
        # last_seen from frames, written at most once per LAST_SEEN_WRITE_INTERVAL_MS per device
        latest: Dict[str, int] = {}
        for f in frames:
            latest[f.device_id] = max(latest.get(f.device_id, 0), f.received_ms)
        for device_id, seen in latest.items():
            if seen - self._last_seen_written.get(device_id, 0) >= LAST_SEEN_WRITE_INTERVAL_MS:
                self.store.upsert_device(device_id, last_seen_ms=seen)
                self._last_seen_written[device_id] = seen
        # everything is committed: acknowledge in arrival order
        for m, why in rejected:
            self._reject(m, why)
        stored = sum(1 for r in results if r)
        with self._lock:
            gen = self._generation
            self.stats.received += len(batch)
            self.stats.stored += stored
            self.stats.duplicates += len(results) - stored
            self.stats.telemetry += n_tele
            self.stats.status += n_status
        if self.on_stored is not None and frames:
            self.on_stored(frames)
        acked = 0
        for m in batch:
            if m.qos > 0 and m.generation == gen:  # older connections' messages are resent by the broker
                self.client.ack(m.mid, m.qos)
                acked += 1
        with self._lock:
            self.stats.acked += acked

    def _validate_one(self, m: Message) -> Validated:
        try:
            device_id, kind = topics.parse_device_topic(m.topic)
        except ValueError:
            return None
        if kind != "frames":
            return None
        try:
            return validate_frame(device_id, m.payload, self.cfg.max_payload_bytes, m.received_ms)
        except PayloadRejected as exc:
            return exc

    def _validate_chunk(self, chunk: List[Message]) -> List[Validated]:
        return [self._validate_one(m) for m in chunk]

    def _validate_frames(self, batch: List[Message]) -> List[Validated]:
        """Validate every frame of the batch; image decoding releases the GIL, so a pool helps. The batch
        is split into one contiguous chunk per worker (one task each, not one per frame: less overhead)."""
        if self._pool is None or len(batch) < 2:
            return self._validate_chunk(batch)
        n = min(self._workers, len(batch))
        size = -(-len(batch) // n)
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        out: List[Validated] = []
        for part in self._pool.map(self._validate_chunk, chunks):
            out.extend(part)
        return out

    def _store_frames(self, frames: List[FrameRecord]) -> List[bool]:
        if not frames:
            return []
        try:
            return self.store.add_frames(frames)
        except StoreUnavailable:
            raise
        except StoreError:
            # one bad record must not block the rest: retry one by one, count the ones refused
            out: List[bool] = []
            refused = 0
            for f in frames:
                try:
                    out.append(self.store.add_frame(f))
                except StoreUnavailable:
                    raise
                except StoreError as exc:
                    log.error("store refused frame %s: %s", f.frame_id, exc)
                    refused += 1
                    out.append(False)
            with self._lock:
                self.stats.rejected["store_error"] += refused
            return out
