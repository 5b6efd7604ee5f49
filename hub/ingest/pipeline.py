"""MQTT ingest: frames, telemetry and status from the devices into the store.

Guarantees (docs/hub.md):

* Frames arrive on the shared subscription ``$share/<group>/kestrel/v1/devices/+/frames`` (QoS 1),
  so several hub processes split them. The session is persistent (MQTT 3.1.1, clean_session=False,
  fixed client id): the broker queues this hub's share while it is down and resends what was
  delivered but not acknowledged.
* A message is acknowledged (PUBACK) only after the store committed it. paho runs in manual-ack
  mode; ``on_message`` only enqueues; a validate thread parses the batch and decodes its images (on
  a small pool: decoding releases the GIL); a stage thread lets the store write the batch's images
  ahead (Store.stage_frames: SQLite's segment files); a commit thread writes the batch to the store
  (one Store.apply_batch) and only then acknowledges it, in arrival order.
* Storage is idempotent on frame_id: a redelivery never creates a second record. A frame whose id
  is already stored for *another* device is not silently dropped as a duplicate: it is rejected
  (``frame_id_conflict``) and kept in the dead-letter folder.
* Bad payloads are counted per reason, logged (rate-limited) and acknowledged: redelivery cannot
  fix them, and they never stop the ingest.
* Any store failure (StoreUnavailable, StoreError, or an unexpected error): the commit thread keeps
  the batch, acknowledges nothing, and retries with exponential backoff (``paused`` in /healthz)
  until it succeeds. It never dies of it. A frame is given up on only when the store clearly
  refuses that record (others of the batch were stored, or a probe write succeeds after
  ``POISON_ATTEMPTS`` attempts): then its raw payload goes to the dead-letter folder first, and it
  is counted as ``store_error``, never as a duplicate.

Parsing and checking a message is hub/ingest/parse.py; writing a dead letter, hub/ingest/deadletter.py.
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import paho.mqtt.client as mqtt

from hub.broker import BrokerTarget
from hub.config import MqttSection
from hub.errors import ConfigError, PayloadRejected, StoreError, StoreUnavailable
from hub.ingest import mqttsock
from hub.ingest.deadletter import DeadLetters
from hub.ingest.parse import DEAD_LETTER_REASONS, REASONS, DeviceUpdate, parse_device_message, validate_frame
from hub.store.base import FrameRecord, Store
from hub.store.series import SeriesPoint
from proto import topics

log = logging.getLogger("hub.ingest.pipeline")

REJECT_LOG_INTERVAL_S = 10.0
LAST_SEEN_WRITE_INTERVAL_MS = 1000
QUEUE_POLL_S = 0.2
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 10.0
PREPARED_MAX = 4          # validated batches waiting for the commit thread
POISON_ATTEMPTS = 3       # a batch whose every frame the store refuses is retried this often before a probe
SLOW_COMMIT_MS = 1000.0   # a batch that takes longer than this to commit is logged (rate-limited)
PUBACK_FORMAT = struct.Struct("!BBH")  # MQTT 3.1.1 PUBACK: type, remaining length 2, packet id
UNKNOWN_DEVICE_CACHE_S = 5.0  # allow_unknown_devices = false: a refused device is looked up again after this
UNKNOWN_DEVICES_MAX = 10000   # refused devices remembered at most (then forgotten all at once)

def now_ms() -> int:
    return int(time.time() * 1000)


# what the validate stage made of each message of a batch (None: a cleared retained status)
Validated = Union[FrameRecord, DeviceUpdate, PayloadRejected, None]


@dataclass
class Message:
    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int
    received_ms: int


@dataclass
class _BatchState:
    """What earlier attempts at one batch already achieved: a retry never stores, counts or
    dead-letters a frame twice."""
    outcomes: Dict[int, str] = field(default_factory=dict)   # batch index -> stored/duplicate/conflict/refused
    details: Dict[int, str] = field(default_factory=dict)    # batch index -> why (conflict/refused)
    dead_lettered: Set[int] = field(default_factory=set)      # batch indexes


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    telemetry: int = 0
    status: int = 0
    acked: int = 0
    store_retries: int = 0
    dead_lettered: int = 0
    dropped_qos0: int = 0
    commits: int = 0
    commit_ms_last: float = 0.0
    commit_ms_max: float = 0.0
    commit_ms_total: float = 0.0
    paused: bool = False
    connected: bool = False
    last_store_error: str = ""
    rejected: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})

    def snapshot(self) -> Dict[str, Any]:
        return {"received": self.received, "stored": self.stored, "duplicates": self.duplicates,
                "telemetry": self.telemetry, "status": self.status, "acked": self.acked,
                "store_retries": self.store_retries, "dead_lettered": self.dead_lettered,
                "dropped_qos0": self.dropped_qos0, "commits": self.commits,
                "commit_ms_last": round(self.commit_ms_last, 2), "commit_ms_max": round(self.commit_ms_max, 2),
                "commit_ms_total": round(self.commit_ms_total, 1), "paused": self.paused,
                "connected": self.connected, "last_store_error": self.last_store_error,
                "rejected": dict(self.rejected)}


class Ingest:
    """Subscribe, validate, store, then acknowledge. ``start()`` returns at once (connects in background).

    ``dead_letter_dir``: where frames the store refuses (or whose id another device owns) are kept
    before they are acknowledged (HubConfig.dead_letter_dir). ``on_commit(seconds, stored frames)`` is
    called after every committed batch (hub.metrics.HubMetrics.batch_committed).
    """

    def __init__(self, store: Store, target: BrokerTarget, cfg: MqttSection, client_id: str,
                 dead_letter_dir: Path,
                 on_commit: Optional[Callable[[float, Sequence[FrameRecord]], None]] = None) -> None:
        self.store = store
        self.on_commit = on_commit
        self.target = target
        self.cfg = cfg
        self.client_id = client_id
        self.dead_letter_dir = Path(dead_letter_dir)
        self._dead_letters = DeadLetters(self.dead_letter_dir)
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._generation = 0
        self._known: Set[str] = set()
        self._registering: Set[str] = set()  # new devices of the batch being processed
        self._refused: Dict[str, float] = {}  # unknown devices refused -> monotonic time to look again
        self._pending_seen: Dict[str, int] = {}
        self._last_seen_flush = 0
        self._reject_log: Dict[str, Tuple[float, int]] = {}
        self._slow_log = 0.0
        self._subscribed = threading.Event()
        self._threads: List[threading.Thread] = []
        self._validated: queue.Queue[Tuple[List[Message], List[Validated]]] = queue.Queue(maxsize=PREPARED_MAX)
        self._prepared: queue.Queue[Tuple[List[Message], List[Validated]]] = queue.Queue(maxsize=PREPARED_MAX)
        workers = cfg.validate_workers or min(4, os.cpu_count() or 1)
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ingest-validate") \
            if workers > 1 else None
        self.client = self._make_client()

    # ---- MQTT ----
    def _make_client(self) -> mqtt.Client:
        c = mqttsock.make_client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                                 protocol=mqtt.MQTTv311)
        c.manual_ack_set(True)
        c.max_inflight_messages_set(100)
        c.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
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
        # QoS 1 is bounded by the broker's in-flight window (we ack late); QoS 0 is not: shed it
        if msg.qos == 0 and self._queue.qsize() >= self.cfg.queue_max_qos0:
            with self._lock:
                self.stats.dropped_qos0 += 1
            return
        # _generation is written only on this (paho's) thread: reading it needs no lock
        self._queue.put(Message(msg.mid, msg.qos, msg.topic, bytes(msg.payload), self._generation, now_ms()))

    # ---- lifecycle ----
    def start(self) -> Ingest:
        self._threads = [threading.Thread(target=self._validate_loop, name="ingest-validate", daemon=True),
                         threading.Thread(target=self._stage_loop, name="ingest-stage", daemon=True),
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

    @property
    def threads_alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def health(self) -> Dict[str, Any]:
        with self._lock:
            snap = self.stats.snapshot()
        snap["threads_alive"] = self.threads_alive
        return snap

    # ---- validate stage ----
    def _validate_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                continue
            batch = [first]
            size = len(first.payload)
            while len(batch) < self.cfg.batch_max and size < self.cfg.batch_max_bytes:
                try:
                    m = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(m)
                size += len(m.payload)
            self._put(self._validated, (batch, self._validate_batch(batch)))

    def _put(self, q: queue.Queue[Tuple[List[Message], List[Validated]]],
             item: Tuple[List[Message], List[Validated]]) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=QUEUE_POLL_S)
                return
            except queue.Full:
                continue

    def _stage_loop(self) -> None:
        """Between validation and commit: the store writes a validated batch's images ahead (its own
        write and fsync) while the commit thread commits the batch before."""
        while not self._stop.is_set():
            try:
                item = self._validated.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                continue
            self._stage(item[1])
            self._put(self._prepared, item)

    def _stage(self, validated: List[Validated]) -> None:
        """Let the store write the batch's images ahead (Store.stage_frames) while the commit thread still
        commits the batch before: writing them and committing rows overlap. Frames of devices not known
        yet are left to the commit when unknown devices are refused (no bytes written for strangers)."""
        frames = [v for v in validated if isinstance(v, FrameRecord)
                  and (self.cfg.allow_unknown_devices or v.device_id in self._known)]
        if not frames:
            return
        try:
            self.store.stage_frames(frames)
        except Exception as exc:  # noqa: BLE001 - only an optimisation: apply_batch writes them itself
            log.debug("writing images ahead failed (the commit writes them): %s", exc)

    def _validate_one(self, m: Message) -> Validated:
        """Parse any message (topic included) off the commit thread: a frame, a device update, or why not."""
        try:
            device_id, kind = topics.parse_device_topic(m.topic)
        except ValueError as exc:
            return PayloadRejected("bad_topic", str(exc))
        try:
            if kind == "frames":
                return validate_frame(device_id, m.payload, self.cfg.max_payload_bytes, m.received_ms,
                                      self.cfg.image_check)
            if kind in ("telemetry", "status"):
                return parse_device_message(device_id, kind, m.payload, m.received_ms)
            return PayloadRejected("bad_topic", f"unexpected topic kind {kind!r}")
        except PayloadRejected as exc:
            return exc
        except Exception as exc:  # a bug or a library surprise: keep the payload, never stop the ingest
            log.exception("validating a message on %s failed unexpectedly", m.topic)
            return PayloadRejected("validation_error", f"{type(exc).__name__}: {exc}")

    def _validate_chunk(self, chunk: List[Message]) -> List[Validated]:
        return [self._validate_one(m) for m in chunk]

    def _validate_batch(self, batch: List[Message]) -> List[Validated]:
        """Validate every message of the batch; image decoding releases the GIL, so a pool helps. The batch
        is split into one contiguous chunk per worker (one task each, not one per frame: less overhead)."""
        if self._pool is None or len(batch) < 2:
            return self._validate_chunk(batch)
        n = min(self._workers, len(batch))
        size = -(-len(batch) // n)
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        out: List[Validated] = []
        try:
            for part in self._pool.map(self._validate_chunk, chunks):
                out.extend(part)
        except RuntimeError:  # the pool is shut down (stopping): validate here
            return self._validate_chunk(batch)
        return out

    # ---- commit stage ----
    def _commit_loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch, validated = self._prepared.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                continue
            # under load several validated batches wait: commit them together (one fsync)
            size = sum(len(m.payload) for m in batch)
            while len(batch) < self.cfg.batch_max and size < self.cfg.batch_max_bytes:
                try:
                    more, more_validated = self._prepared.get_nowait()
                except queue.Empty:
                    break
                batch, validated = batch + more, validated + more_validated
                size += sum(len(m.payload) for m in more)
            self._process_with_retry(batch, validated)

    def _process_with_retry(self, batch: List[Message], validated: List[Validated]) -> None:
        """Commit one batch, retrying on any failure until it succeeds or the ingest stops.

        Nothing of the batch is acknowledged before every write succeeded, so giving up (stopping)
        leaves it with the broker, which resends it to the next session with this client id."""
        delay = self.cfg.retry_initial_s
        state = _BatchState()
        attempt = 0
        while True:
            attempt += 1
            try:
                self._process(batch, validated, state, attempt)
                if self.stats.paused:
                    log.info("store is back; ingest resumed")
                with self._lock:
                    self.stats.paused = False
                return
            except Exception as exc:  # noqa: BLE001 - whatever failed, the thread lives and acks nothing
                what = "store unavailable" if isinstance(exc, StoreUnavailable) else \
                    "store error" if isinstance(exc, StoreError) else "unexpected error"
                with self._lock:
                    first = not self.stats.paused
                    self.stats.paused = True
                    self.stats.store_retries += 1
                    self.stats.last_store_error = f"{what}: {exc}"
                if first:
                    log.error("%s, ingest paused (nothing acknowledged, retrying): %s", what, exc,
                              exc_info=not isinstance(exc, StoreError))
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
        """Refuse an unknown device (allow_unknown_devices = false) or note it for auto-registration,
        which _process does with the batch's other writes: a device whose first message is its status
        appears with that status at once, never as a blank record first. May raise StoreError."""
        if device_id in self._known or device_id in self._registering:
            return
        refused_until = self._refused.get(device_id)
        if refused_until is not None and time.monotonic() < refused_until:
            raise PayloadRejected("unknown_device", f"device {device_id!r} is not registered "
                                                    "(allow_unknown_devices = false)")
        if self.store.get_device(device_id) is None:
            if not self.cfg.allow_unknown_devices:
                # remembered a while: a stranger's every message must not cost a store lookup
                if len(self._refused) >= UNKNOWN_DEVICES_MAX:
                    self._refused.clear()
                self._refused[device_id] = time.monotonic() + UNKNOWN_DEVICE_CACHE_S
                raise PayloadRejected("unknown_device", f"device {device_id!r} is not registered "
                                                        "(allow_unknown_devices = false)")
            self._registering.add(device_id)
        else:
            self._known.add(device_id)

    def _classify(self, batch: List[Message], validated: List[Validated]) -> Tuple[
            List[Tuple[int, PayloadRejected]], List[Tuple[int, FrameRecord]],
            List[Tuple[str, Dict[str, object]]], Dict[str, int], int, int]:
        """Sort a batch into rejections, frames, device updates and last-seen times. May raise StoreError
        (device lookups); nothing is written for frames yet."""
        rejected: List[Tuple[int, PayloadRejected]] = []
        frames: List[Tuple[int, FrameRecord]] = []
        device_updates: List[Tuple[str, Dict[str, object]]] = []
        seen: Dict[str, int] = {}
        n_tele = n_status = 0
        for i, v in enumerate(validated):
            try:
                if isinstance(v, PayloadRejected):
                    raise v
                if isinstance(v, FrameRecord):
                    self._check_device(v.device_id)
                    frames.append((i, v))
                elif isinstance(v, DeviceUpdate):
                    self._check_device(v.device_id)
                    device_updates.append((v.device_id, v.fields))
                    seen[v.device_id] = max(seen.get(v.device_id, 0), v.seen_ms)
                    n_tele += v.kind == "telemetry"
                    n_status += v.kind == "status"
            except PayloadRejected as exc:
                rejected.append((i, exc))
        return rejected, frames, device_updates, seen, n_tele, n_status

    def _process(self, batch: List[Message], validated: List[Validated], state: _BatchState,
                 attempt: int) -> None:
        """Commit, then count and acknowledge. Safe to re-run after any failure: nothing is counted
        or acknowledged before every store write of the batch succeeded, and ``state`` remembers
        what earlier attempts stored or dead-lettered."""
        t0 = time.monotonic()
        self._registering = set()
        rejected, frames, device_updates, seen, n_tele, n_status = self._classify(batch, validated)
        refused = {i for i, _ in rejected}
        points = [v.point for i, v in enumerate(validated)  # the telemetry series (hub/store/series.py)
                  if isinstance(v, DeviceUpdate) and v.point is not None and i not in refused]
        # one upsert per device and batch: its messages' fields merged in arrival order (the last wins)
        devices: Dict[str, Dict[str, object]] = {}
        for device_id, fields_ in device_updates:
            devices.setdefault(device_id, {}).update(fields_)
        for device_id in self._registering:
            devices.setdefault(device_id, {})
        # last_seen: raised (never lowered) at most once per LAST_SEEN_WRITE_INTERVAL_MS, and with
        # every batch that writes a device anyway. A frame on a device's topic is word from it.
        for _, rec in frames:
            seen[rec.device_id] = max(seen.get(rec.device_id, 0), rec.received_ms)
        for device_id, ms in seen.items():
            self._pending_seen[device_id] = max(self._pending_seen.get(device_id, 0), ms)
        t_now = now_ms()
        flush_seen = bool(self._pending_seen) and (
            bool(devices) or t_now - self._last_seen_flush >= LAST_SEEN_WRITE_INTERVAL_MS)
        self._write_batch(frames, devices, dict(self._pending_seen) if flush_seen else {}, state, attempt, points)
        if flush_seen:
            self._pending_seen.clear()
            self._last_seen_flush = t_now
        for device_id in sorted(self._registering):
            log.info("auto-registered device %s", device_id)
        self._known |= self._registering
        self._registering = set()
        # everything is committed: count, then acknowledge in arrival order
        outcomes = [state.outcomes.get(i) for i, _ in frames]
        for i, _rec in frames:
            outcome = state.outcomes.get(i)
            if outcome == "conflict":
                rejected.append((i, PayloadRejected("frame_id_conflict", state.details.get(i, ""))))
            elif outcome == "refused":
                rejected.append((i, PayloadRejected("store_error", state.details.get(i, ""))))
        # frames given up on: keep their payload before the ack lets the broker forget them
        for i, why in rejected:
            if why.reason in DEAD_LETTER_REASONS and i not in state.dead_lettered:
                self._dead_letters.keep(batch[i], why.reason, str(why), i, now_ms())
                state.dead_lettered.add(i)
        for i, why in rejected:
            self._reject(batch[i], why)
        commit_ms = (time.monotonic() - t0) * 1000.0
        with self._lock:
            gen = self._generation
            self.stats.received += len(batch)
            self.stats.stored += outcomes.count("stored")
            self.stats.duplicates += outcomes.count("duplicate")
            self.stats.dead_lettered += len(state.dead_lettered)
            self.stats.telemetry += n_tele
            self.stats.status += n_status
            self.stats.commits += 1
            self.stats.commit_ms_last = commit_ms
            self.stats.commit_ms_max = max(self.stats.commit_ms_max, commit_ms)
            self.stats.commit_ms_total += commit_ms
        if self.on_commit is not None:
            self.on_commit(commit_ms / 1000.0, [f for i, f in frames if state.outcomes.get(i) == "stored"])
        if commit_ms > SLOW_COMMIT_MS and time.monotonic() - self._slow_log >= REJECT_LOG_INTERVAL_S:
            self._slow_log = time.monotonic()
            log.warning("committing a batch of %d messages took %.0f ms", len(batch), commit_ms)
        # older connections' messages are not acknowledged: the broker resends them
        acked = self._ack([m for m in batch if m.qos > 0 and m.generation == gen])
        with self._lock:
            self.stats.acked += acked

    def _ack(self, msgs: List[Message]) -> int:
        """Acknowledge in arrival order. paho sends each ack as its own packet, with a wake-up write to
        its network thread per ack (two syscalls and a GIL hand-over each, per frame); the QoS 1 acks of
        a batch go out as one write instead: PUBACK packets back to back in one buffer, queued like
        paho's own (paho keeps no state for received QoS 1 messages, so nothing is bypassed)."""
        queue_packet = getattr(self.client, "_packet_queue", None)
        ones = [m.mid for m in msgs if m.qos == 1]
        if queue_packet is not None and len(ones) > 1:
            queue_packet(mqtt.PUBACK, b"".join(PUBACK_FORMAT.pack(mqtt.PUBACK, 2, mid) for mid in ones), 0, 0)
            rest = [m for m in msgs if m.qos != 1]
        else:
            rest = msgs
        for m in rest:
            self.client.ack(m.mid, m.qos)
        return len(msgs)

    @staticmethod
    def _outcome(state: _BatchState, i: int, f: FrameRecord, owner: Optional[str]) -> None:
        """Record what the store said of frame ``i``: stored now (None), or the device its id is stored for:
        a redelivery when that is the frame's own device, else a conflict (decided from the same store
        call that found the id, so a failure between the two cannot let a forged id pass as a duplicate)."""
        if owner is None:
            state.outcomes[i] = "stored"
        elif owner == f.device_id:
            state.outcomes[i] = "duplicate"
        else:
            state.outcomes[i] = "conflict"
            state.details[i] = (f"frame_id {f.frame_id!r} from device {f.device_id!r} is already "
                                f"stored for device {owner!r}")

    def _write_batch(self, frames: List[Tuple[int, FrameRecord]], devices: Dict[str, Dict[str, object]],
                     seen: Dict[str, int], state: _BatchState, attempt: int,
                     points: Sequence[SeriesPoint] = ()) -> None:
        """Write the batch in one store call (Store.apply_batch: one transaction in SQLite): the frames not
        stored by an earlier attempt, the merged device updates, the last_seen raises. Records each
        frame's outcome in ``state``.

        Raises (so the batch is retried) when the store fails as a whole. When the store refuses the
        batch (StoreError), the device writes go alone and the frames one by one: a frame is marked
        ``refused`` only when the failure is clearly about that record: another frame of the batch
        went in, or, when all of them failed POISON_ATTEMPTS times, a probe write succeeds."""
        todo = [(i, f) for i, f in frames if i not in state.outcomes]
        if not todo and not devices and not seen and not points:
            return
        try:
            owners = self.store.apply_batch([f for _, f in todo], devices, seen, points)
        except StoreUnavailable:
            raise
        except StoreError as exc:
            if not todo:
                raise
            log.warning("the store refused a batch of %d frames (%s); trying them one by one", len(todo), exc)
        else:
            for (i, f), owner in zip(todo, owners):
                self._outcome(state, i, f, owner)
            return
        if devices or seen:
            self.store.apply_batch([], devices, seen, points)  # raises if these are what the store refuses
        refused: List[Tuple[int, FrameRecord, StoreError]] = []
        for i, f in todo:
            try:
                owner = self.store.add_frames([f])[0]
            except StoreUnavailable:
                raise
            except StoreError as exc:
                refused.append((i, f, exc))
                continue
            self._outcome(state, i, f, owner)
        if refused:
            some_went_in = any(i in state.outcomes for i, _ in frames)
            if not some_went_in:
                if attempt < POISON_ATTEMPTS:
                    raise refused[0][2]
                # the store may be broken as a whole: a probe write tells (raises if it is)
                self.store.upsert_device(refused[0][1].device_id)
            for i, f, why in refused:
                state.outcomes[i] = "refused"
                state.details[i] = f"the store refused frame {f.frame_id!r}: {why}"
