"""The seam between the daemon and the updater; the daemon (edge/daemon.py) calls exactly these methods.

Lifecycle inside ``kestrel-edge run``::

    svc = UpdateService(cfg, publisher, holder, stats)
    model = svc.boot_model()      # the model to start on (active slot; boot-count rollback), or None
    svc.start()                   # follow desired state (MQTT), start background work
    ... for every inference: svc.observe(result)   # trial health watch
    svc.version_manifest()        # -> proto VersionManifest for status messages
    svc.stop()

All slow work (download, verify, stage, self-test, switch, rollback) runs in one background worker
thread; ``observe`` only appends to the health watch and wakes the worker when a verdict is due.
The CLI talks to a running daemon through ``{data_dir}/update/control.json`` (polled every
CONTROL_POLL_S); see docs/updates.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from edge.errors import KestrelError
from edge.updater import state as st
from edge.updater.engine import DaemonLock, NothingToDo, UpdateBusy, Updater
from edge.updater.health import HealthWatch, TrialCriteria

log = logging.getLogger("kestrel.updater")

CONTROL_POLL_S = 0.5
RETIRE_AFTER_S = 2.0  # a swapped-out model is closed this long after the swap (frames in flight)


def criteria_from(cfg: Any) -> TrialCriteria:
    u = cfg.update
    return TrialCriteria(frames=u.trial_frames, seconds=u.trial_seconds,
                         max_latency_ratio=u.trial_max_latency_ratio,
                         max_low_conf_rate=u.trial_max_low_conf_rate,
                         max_errors=u.trial_max_errors, latency_floor_s=u.trial_latency_floor_ms / 1000.0)


class UpdateService:
    def __init__(self, cfg: Any, publisher: Any, holder: Any, stats: Any) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.holder = holder
        self.stats = stats
        self.updater = Updater(cfg, listener=self._report)
        self.health = HealthWatch(criteria_from(cfg))
        self._q: queue.Queue[Tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = DaemonLock(self.updater.dir)
        self._previous_model: Any = None  # kept loaded during a trial: rollback is one swap
        self._retired: List[Tuple[float, Any]] = []
        self._desired: Dict[str, Any] = {}  # "device" / "group" -> DesiredState (or None when cleared)
        self._handled_desired: Optional[Tuple[str, int, bool, int]] = None

    # ---- daemon seam ----
    def boot_model(self) -> Optional[Any]:
        """Load the model of the active slot (or roll back first if the trial crashed too often)."""
        slot = self.updater.boot_slot()
        if slot is None:
            return None
        model = self.updater.load_slot(slot)
        trial = self.updater.state.trial
        if self.updater.state.state == st.TRIAL and trial:
            self.health.begin_trial(model.ref, trial.get("baseline"))
            log.info("continuing the trial of %s v%d (start %d of at most %d)", slot.model_name, slot.version,
                     int(trial.get("boot_count", 0)), self.cfg.update.max_boot_attempts)
        return model

    def start(self) -> None:
        """Subscribe to the desired-state topics and start background work."""
        if not self._lock.acquire():
            log.warning("another daemon holds %s; CLI requests may go to it", self._lock.path)
        if self.cfg.update.enabled and self.publisher is not None:
            from edge import topics

            dev = self.cfg.device.resolved_id
            self.publisher.subscribe(topics.device_desired(dev), self._on_desired, topics.QOS_DESIRED)
            self.publisher.subscribe(topics.group_desired(self.cfg.device.group), self._on_desired,
                                     topics.QOS_DESIRED)
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()

    def observe(self, result: Any) -> None:
        """Called by the inference loop after every frame (edge.pipeline.InferenceResult)."""
        verdict = self.health.observe(result)
        if verdict is not None:
            self._q.put(("verdict", verdict))

    def version_manifest(self) -> Any:
        return self.updater.manifest()

    def stop(self) -> None:
        """Stop background work; never leaves a half-switched slot."""
        self._stop.set()
        self._q.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=60)
        trial = self.updater.state.trial
        if self.updater.state.state == st.TRIAL and trial and int(trial.get("boot_count", 0)) > 0:
            trial["boot_count"] = int(trial["boot_count"]) - 1  # a clean stop is not a crash
            self.updater.state.update(trial=trial)
        for _t, m in self._retired:
            m.close()
        self._retired = []
        if self._previous_model is not None:
            self._previous_model.close()
            self._previous_model = None
        self._lock.release()

    # ---- public helpers (tests, CLI-in-process) ----
    def install_bytes(self, data: bytes, *, source: str = "") -> bool:
        """Verify, stage, self-test and hot-swap ``data`` in the calling thread. False = nothing to do."""
        try:
            with self.updater.locked():
                slot = self.updater.prepare(data, source=source)
                self._switch(slot.name)
        except NothingToDo as exc:
            log.info("%s", exc)
            return False
        return True

    def submit_desired(self, desired: Any) -> None:
        self._q.put(("desired", desired))

    # ---- reporting ----
    def _report(self, snap: Dict[str, Any]) -> None:
        if self.publisher is None:
            return
        from edge import topics
        from proto import kestrel_pb2

        msg = kestrel_pb2.Status(device_id=self.cfg.device.resolved_id, state=topics.STATE_ONLINE,
                                 time_ms=int(time.time() * 1000), group=self.cfg.device.group)
        model = self.holder.get() if self.holder is not None else None
        if model is not None:
            msg.model.CopyFrom(model.ref)
        msg.versions.CopyFrom(self.updater.manifest())
        self.publisher.publish_status(msg)

    # ---- desired state (MQTT I/O thread: keep short) ----
    def _on_desired(self, topic: str, payload: bytes) -> None:
        from proto import kestrel_pb2

        kind = "group" if "/groups/" in topic else "device"
        if not payload:
            self._desired[kind] = None
            return
        try:
            msg = kestrel_pb2.DesiredState.FromString(payload)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError; anything else is bad input too
            log.warning("ignoring an unreadable desired-state message on %s", topic)
            return
        self._desired[kind] = msg
        chosen = self._desired.get("device") or self._desired.get("group")
        if chosen is not None:
            self._q.put(("desired", chosen))

    # ---- the worker ----
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, arg = self._q.get(timeout=CONTROL_POLL_S)
            except queue.Empty:
                kind, arg = "tick", None
            try:
                if kind == "stop":
                    break
                if kind == "verdict":
                    self._on_verdict(arg)
                elif kind == "desired":
                    self._on_desired_state(arg)
                verdict = self.health.check_time()
                if verdict is not None:
                    self._on_verdict(verdict)
                req = self.updater.take_request()
                if req is not None:
                    self._on_request(req)
                self._close_retired()
            except KestrelError as exc:
                log.warning("update refused: %s", exc)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("updater worker error")

    def _close_retired(self, force: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for t, m in self._retired:
            if force or now - t >= RETIRE_AFTER_S:
                m.close()
            else:
                keep.append((t, m))
        self._retired = keep

    def _switch(self, slot_name: str) -> None:
        """Load the staged slot, persist TRIAL, flip the pointer, hot-swap; keep the old model loaded."""
        slot = self.updater.slots.slot(slot_name)
        if slot is None:
            raise UpdateBusy(f"slot {slot_name} vanished before the switch")
        model = self.updater.load_slot(slot)
        baseline = self.health.baseline()
        self.updater.begin_trial(slot_name, baseline=baseline, boot_count=1)
        previous = self.holder.swap(model) if self.holder is not None else None
        if self._previous_model is not None:
            self._retired.append((time.monotonic(), self._previous_model))
        self._previous_model = previous
        self.health.begin_trial(model.ref, baseline)
        if self.cfg.update.trial_frames <= 0 and self.cfg.update.trial_seconds <= 0:
            self._on_verdict(("commit", "no trial configured"))

    def _on_verdict(self, verdict: Tuple[str, str]) -> None:
        what, reason = verdict
        if self.updater.state.state != st.TRIAL:
            self.health.end_trial()
            return
        if what == "commit":
            self.updater.commit(reason)
            self.health.end_trial()
            if self._previous_model is not None:
                self._retired.append((time.monotonic(), self._previous_model))
                self._previous_model = None
        else:
            self._rollback(reason, reject=True)

    def _rollback(self, reason: str, *, reject: bool) -> bool:
        """Hot-swap back to the previous slot's model, then persist the pointer and ROLLED_BACK."""
        with self.updater.locked():
            slot = self.updater.rollback_target()
            if slot is None:
                log.warning("rollback requested (%s) but there is no previous slot", reason)
                return False
            model = self._previous_model
            self._previous_model = None
            if model is None or getattr(model.ref, "sha256", None) != slot.model_sha256:
                if model is not None:
                    self._retired.append((time.monotonic(), model))
                model = self.updater.load_slot(slot)
            old = self.holder.swap(model) if self.holder is not None else None
            if old is not None:
                self._retired.append((time.monotonic(), old))
            self.health.end_trial()
            self.updater.rollback(reason, reject=reject, target=slot)
        log.warning("rolled back to %s v%d: %s", slot.model_name, slot.version, reason)
        return True

    def _on_request(self, req: Dict[str, Any]) -> None:
        action = req.get("action")
        log.info("control request: %s", action)
        self.updater.state.reload()  # the CLI changed the state file under us
        if action == "switch":
            snap = self.updater.state.snapshot()
            slot = str(req.get("slot", ""))
            if snap["state"] != st.SELF_TEST or snap.get("pending_slot") != slot:
                log.warning("ignoring a switch request for slot %s: state %s", slot, snap["state"])
                return
            with self.updater.locked():
                self._switch(slot)
        elif action == "rollback":
            self._rollback(str(req.get("reason") or "manual rollback (kestrel-edge rollback)"), reject=True)
        else:
            log.warning("unknown control request %r", action)

    def _on_desired_state(self, desired: Any) -> None:
        key = (desired.model_name, int(desired.version), bool(desired.rollback), int(desired.issued_ms))
        if key == self._handled_desired:
            return
        self._handled_desired = key
        if desired.rollback:
            self._fleet_rollback(desired)
            return
        installed = self.updater.installed_version()
        name, version = desired.model_name, int(desired.version)
        if version == installed:
            return  # equal: nothing to do
        if version < installed:
            log.warning("desired %s v%d is older than installed v%d: refused as a downgrade "
                        "(fleet rollback uses rollback=true)", name, version, installed)
            return
        state = self.updater.state.state
        if state == st.TRIAL:
            log.info("desired v%d waits for the current trial to finish", version)
            self._handled_desired = None
            threading.Timer(CONTROL_POLL_S * 4, self._q.put, args=(("desired", desired),)).start()
            return
        rejected = self.updater.state.is_rejected(name, version)
        if rejected:
            log.info("desired %s v%d was refused before (%s); not retrying", name, version, rejected)
            return
        self._fetch_and_install(desired)

    def _fetch_and_install(self, desired: Any) -> None:
        from edge.updater.fetch import fetch_bundle

        name, version = desired.model_name, int(desired.version)
        with self.updater.locked():
            target = desired.grpc_target or self.cfg.update.hub_grpc
            self.updater._transition(st.DOWNLOADING, reason=f"from {target}", model_name=name,
                                     target_version=version)
            try:
                part = fetch_bundle(target, name, version, downloads=self.updater.downloads,
                                    sha256=desired.sha256, size=int(desired.size),
                                    max_bundle_bytes=self.cfg.update.max_bundle_bytes, stop=self._stop)
            except KestrelError as exc:
                reject = getattr(exc, "reason", "") in ("too_large", "hash_mismatch", "not_found")
                self.updater._transition(st.FAILED, reason=f"download failed: {exc}", reject=reject)
                if not reject:
                    self._handled_desired = None  # transport trouble: the next message (or restart) retries
                return
            data = part.read_bytes()
            try:
                slot = self.updater.prepare(data, source=f"hub {name} v{version}")
            except NothingToDo:
                part.unlink()
                return
            except KestrelError:
                part.unlink()
                raise
            part.unlink()
            self._switch(slot.name)

    def _fleet_rollback(self, desired: Any) -> None:
        state = self.updater.state.state
        if state == st.TRIAL:
            self._rollback("fleet rollback ordered by the hub", reject=True)
            return
        active = self.updater.slots.active()
        prev = self.updater.slots.inactive()
        if active is None or prev is None:
            log.warning("fleet rollback: no previous slot on this device; keeping the running model")
            return
        if prev.version >= active.version:
            return  # already on the older of the two slots: a re-delivered rollback does nothing
        self._rollback("fleet rollback ordered by the hub", reject=True)
