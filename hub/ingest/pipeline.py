"""The ingest's batch pipeline: messages in, committed to the store, then handed back to acknowledge.

Guarantees (docs/hub.md):

* A message is acknowledged only after the store committed it. ``offer`` (called on the MQTT
  link's thread, hub/ingest/mqttlink.py) only enqueues; a validate thread parses the batch and
  decodes its images (on a small pool: decoding releases the GIL); a stage thread lets the store
  write the batch's images ahead (Store.stage_frames: SQLite's segment files); a commit thread writes
  the batch to the store (one Store.apply_batch) and only then hands it back to acknowledge
  (``Acknowledger.ack``: the link), in arrival order.
* Storage is idempotent on frame_id: a redelivery never creates a second record. A frame whose id
  is already stored for *another* device is not silently dropped as a duplicate: it is rejected
  (``frame_id_conflict``) and kept in the dead-letter folder.
* Bad payloads are counted per reason, logged (rate-limited) and acknowledged: redelivery cannot
  fix them, and they never stop the ingest.
* After the commit (and the acks), ``on_receipts`` gets one ``Receipt`` per device of the batch
  (hub/ingest/receipts.py): the frames now durable in the store, and those refused for good.
* Any store failure (StoreUnavailable, StoreError, or an unexpected error): the commit thread keeps
  the batch, acknowledges nothing, and retries with exponential backoff (proto.backoff, from
  ``retry_initial_s`` to ``retry_max_s``; ``paused`` in /healthz) until it succeeds. It never dies of
  it. A frame is given up on only when the store clearly refuses that record (hub/ingest/batchwrite.py):
  then its raw payload goes to the dead-letter folder first, and it is counted as ``store_error``,
  never as a duplicate.

Parsing and checking a message is hub/ingest/parse.py; which devices may send, hub/ingest/devices.py;
writing a batch, hub/ingest/batchwrite.py; a dead letter, hub/ingest/deadletter.py.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from hub.config import MqttSection
from hub.errors import PayloadRejected, StoreError, StoreUnavailable
from hub.ingest import receipts
from hub.ingest.batchwrite import POISON_ATTEMPTS, BatchState, write_batch
from hub.ingest.deadletter import DeadLetters
from hub.ingest.devices import DeviceGate
from hub.ingest.message import Acknowledger, Message
from hub.ingest.parse import DEAD_LETTER_REASONS, DeviceUpdate, parse_device_message, validate_frame
from hub.ingest.stats import IngestStats
from hub.store.base import FrameRecord, Store
from proto import kestrel_pb2, topics
from proto.backoff import Backoff
from proto.clock import now_ms

__all__ = ["POISON_ATTEMPTS", "Message", "Pipeline", "Validated"]

log = logging.getLogger("hub.ingest.pipeline")

REJECT_LOG_INTERVAL_S = 10.0
LAST_SEEN_WRITE_INTERVAL_MS = 1000
QUEUE_POLL_S = 0.2
PREPARED_MAX = 4          # validated batches waiting for the commit thread
SLOW_COMMIT_MS = 1000.0   # a batch that takes longer than this to commit is logged (rate-limited)

# what the validate stage made of each message of a batch (None: a cleared retained status)
Validated = Union[FrameRecord, DeviceUpdate, PayloadRejected, None]


class Pipeline:
    """Validate, stage, commit, then hand back to acknowledge. ``start()`` starts its three threads.

    ``dead_letter_dir``: where frames the store refuses (or whose id another device owns) are kept
    before they are acknowledged (HubConfig.dead_letter_dir). ``on_commit(seconds, stored frames)`` is
    called after every committed batch (hub.metrics.HubMetrics.batch_committed).
    """

    def __init__(self, store: Store, cfg: MqttSection, dead_letter_dir: Path, acknowledger: Acknowledger,
                 on_commit: Optional[Callable[[float, Sequence[FrameRecord]], None]] = None,
                 on_receipts: Optional[Callable[[List[kestrel_pb2.Receipt]], None]] = None,
                 hub_id: str = "") -> None:
        """``on_receipts``: gets each committed batch's receipts (the link publishes them); None = none."""
        self.store = store
        self.on_commit = on_commit
        self.cfg = cfg
        self.acknowledger = acknowledger
        self.on_receipts = on_receipts
        self.hub_id = hub_id
        self.dead_letter_dir = Path(dead_letter_dir)
        self._dead_letters = DeadLetters(self.dead_letter_dir)
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._devices = DeviceGate(store, cfg.allow_unknown_devices, cfg.require_enrolled)
        self._pending_seen: Dict[str, int] = {}
        self._last_seen_flush = 0
        self._reject_log: Dict[str, Tuple[float, int]] = {}
        self._slow_log = 0.0
        self._threads: List[threading.Thread] = []
        self._validated: queue.Queue[Tuple[List[Message], List[Validated]]] = queue.Queue(maxsize=PREPARED_MAX)
        self._prepared: queue.Queue[Tuple[List[Message], List[Validated]]] = queue.Queue(maxsize=PREPARED_MAX)
        workers = cfg.validate_workers or min(4, os.cpu_count() or 1)
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ingest-validate") \
            if workers > 1 else None

    def offer(self, m: Message) -> None:
        """Take one received message (on the MQTT link's thread)."""
        # QoS 1 is bounded by the broker's in-flight window (we ack late); QoS 0 is not: shed it
        if m.qos == 0 and self._queue.qsize() >= self.cfg.queue_max_qos0:
            with self._lock:
                self.stats.dropped_qos0 += 1
            return
        self._queue.put(m)

    def backlog(self) -> int:
        """Messages received and not taken into a batch yet."""
        return self._queue.qsize()

    # ---- lifecycle ----
    def start(self) -> Pipeline:
        self._threads = [threading.Thread(target=self._validate_loop, name="ingest-validate", daemon=True),
                         threading.Thread(target=self._stage_loop, name="ingest-stage", daemon=True),
                         threading.Thread(target=self._commit_loop, name="ingest-commit", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    @property
    def threads_alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return self.stats.snapshot()

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
        frames = [v for v in validated if isinstance(v, FrameRecord) and self._devices.stage_ahead(v.device_id)]
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
        backoff = Backoff(self.cfg.retry_initial_s, self.cfg.retry_max_s, stable_s=0.0)
        state = BatchState()
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
                if self._stop.wait(backoff.next()):
                    return  # shutting down: unacknowledged messages stay with the broker

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
                    self._devices.check(v.device_id)
                    frames.append((i, v))
                elif isinstance(v, DeviceUpdate):
                    self._devices.check(v.device_id)
                    device_updates.append((v.device_id, v.fields))
                    seen[v.device_id] = max(seen.get(v.device_id, 0), v.seen_ms)
                    n_tele += v.kind == "telemetry"
                    n_status += v.kind == "status"
            except PayloadRejected as exc:
                rejected.append((i, exc))
        return rejected, frames, device_updates, seen, n_tele, n_status

    def _process(self, batch: List[Message], validated: List[Validated], state: BatchState,
                 attempt: int) -> None:
        """Commit, then count and acknowledge. Safe to re-run after any failure: nothing is counted
        or acknowledged before every store write of the batch succeeded, and ``state`` remembers
        what earlier attempts stored or dead-lettered."""
        t0 = time.monotonic()
        self._devices.begin()
        rejected, frames, device_updates, seen, n_tele, n_status = self._classify(batch, validated)
        refused = {i for i, _ in rejected}
        points = [v.point for i, v in enumerate(validated)  # the telemetry series (hub/store/series.py)
                  if isinstance(v, DeviceUpdate) and v.point is not None and i not in refused]
        # one upsert per device and batch: its messages' fields merged in arrival order (the last wins)
        devices: Dict[str, Dict[str, object]] = {}
        for device_id, fields_ in device_updates:
            devices.setdefault(device_id, {}).update(fields_)
        for device_id in self._devices.registering:
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
        write_batch(self.store, frames, devices, dict(self._pending_seen) if flush_seen else {}, state, attempt,
                    points)
        if flush_seen:
            self._pending_seen.clear()
            self._last_seen_flush = t_now
        for device_id in sorted(self._devices.registered()):
            log.info("auto-registered device %s", device_id)
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
        # the link acknowledges those of QoS > 0 that came on its current connection (it resends the others)
        acked = self.acknowledger.ack(batch)
        with self._lock:
            self.stats.acked += acked
        if self.on_receipts is not None:
            made = receipts.build(batch, validated, frames, state.outcomes, rejected, self.hub_id, now_ms())
            if made:
                self.on_receipts(made)
                with self._lock:
                    self.stats.receipts += len(made)
                    self.stats.frames_receipted += sum(len(r.frame_ids) for r in made)
                    self.stats.frames_refused_receipted += sum(len(r.refused) for r in made)
