"""The seam between the daemon and the updater; the daemon (edge/daemon.py) calls exactly these methods.

Lifecycle inside ``kestrel-edge run``::

    svc = UpdateService(cfg, publisher, holder, stats)
    model = svc.boot_model()      # the model to start on (active slot; boot-count rollback), or None
    svc.start()                   # follow desired state (MQTT), start background work
    svc.attach_pipeline(progress, on_stall)   # pipeline counters for the hung-model check
    ... for every inference: svc.observe(result)   # trial health watch
    svc.version_manifest()        # -> proto VersionManifest for status messages
    svc.stop()

All slow work (download, verify, stage, self-test, switch, rollback) runs in one background worker
thread; ``observe`` only appends to the health watch and wakes the worker when a verdict is due.
The CLI talks to a running daemon through ``{data_dir}/update/control.json`` (polled every
CONTROL_POLL_S); see docs/updates.md.

Desired-state messages are not authenticated (the MQTT ACL is the only gate): whatever they say,
the device fetches only from its configured hub addresses, installs only a bundle whose signed
manifest names exactly the announced model and version, above its version floor, and a fleet
rollback only moves it to its own committed previous slot, once per ``issued_ms``, when it runs
the version the message rolls back from.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from edge.errors import BundleError, KestrelError
from edge.updater import state as st
from edge.updater.engine import LOCK_WAIT_S, DaemonLock, NoRollbackTarget, NothingToDo, UpdateBusy, Updater
from edge.updater.health import DEFAULT_THRESHOLD, HealthWatch, TrialCriteria

log = logging.getLogger("kestrel.updater")

CONTROL_POLL_S = 0.5
RETRY_DESIRED_S = 60.0  # a desired version whose download failed for a transient reason is retried after this
RETRY_DESIRED_MAX_S = 3600.0  # ... doubling up to this

Progress = Callable[[], Tuple[int, int, bool]]  # (frames captured, frames inferred, pipeline done)


def criteria_from(cfg: Any) -> TrialCriteria:
    u = cfg.update
    return TrialCriteria(frames=u.trial_frames, seconds=u.trial_seconds,
                         max_latency_ratio=u.trial_max_latency_ratio,
                         max_low_conf_rate=u.trial_max_low_conf_rate,
                         max_errors=u.trial_max_errors, latency_floor_s=u.trial_latency_floor_ms / 1000.0,
                         max_latency_s=u.trial_max_latency_ms / 1000.0,
                         max_low_conf_abs=u.trial_max_low_conf_abs, stall_s=u.trial_stall_s)


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
        self._previous_is_factory = False  # the model before the trial was model.path's (no slot)
        self._retired: List[Tuple[Any, int]] = []  # (model, results observed when it was swapped out)
        self._observed = 0
        self._last_ref: Any = None
        self._progress: Optional[Progress] = None
        self._captured_at_trial = 0
        self.on_stall: Optional[Callable[[str], None]] = None
        self._desired: Dict[str, Any] = {}  # "device" / "group" -> DesiredState (or None when cleared)
        self._handled_desired: Optional[Tuple[str, int, bool, int, int]] = None
        self._pending_desired: Any = None  # arrived during a trial: handled when it ends
        self._retry: Optional[Tuple[float, Any]] = None  # (monotonic time, desired) after a transient failure
        self._retry_delay = RETRY_DESIRED_S

    # ---- daemon seam ----
    def boot_model(self) -> Optional[Any]:
        """Load the model of the active slot, re-verified against today's trusted keys, after settling
        an interrupted update (roll back first if the trial crashed too often). None: no slot."""
        if not self._lock.acquire():
            log.warning("another daemon holds %s; CLI requests may go to it", self._lock.path)
        with self.updater.locked(wait_s=LOCK_WAIT_S):
            slot = self.updater.boot_slot()
        if slot is None:
            return None
        model = self.updater.load_slot(slot, verify=False)  # boot_slot re-verified it just now
        trial = self.updater.state.trial
        if self.updater.state.state == st.TRIAL and trial:
            self.health.begin_trial(model.ref, trial.get("baseline"), trial.get("judge_threshold"))
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

    def attach_pipeline(self, progress: Progress, on_stall: Optional[Callable[[str], None]] = None) -> None:
        """The pipeline's counters (for the hung-model check) and what to do when a trial model hangs
        (the daemon stops, and restarts on the rolled-back slot)."""
        self._progress = progress
        self.on_stall = on_stall

    def observe(self, result: Any) -> None:
        """Called by the inference loop after every frame (edge.pipeline.InferenceResult)."""
        self._observed += 1
        self._last_ref = getattr(result, "model_ref", None)
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
        if (self.updater.state.state == st.TRIAL and trial and int(trial.get("boot_count", 0)) > 0
                and self._clean_stop()):
            trial["boot_count"] = int(trial["boot_count"]) - 1  # a clean stop is not a crash
            self.updater.state.update(trial=trial)
        done = True
        if self._progress is not None:
            try:
                done = bool(self._progress()[2])
            except Exception:  # noqa: BLE001 - a counter must not break the stop
                done = False
        if done:  # else the inference thread may still be inside one of them: leave them to the exit
            for m, _n in self._retired:
                m.close()
            self._retired = []
            if self._previous_model is not None:
                self._previous_model.close()
                self._previous_model = None
        self._lock.release()

    def _clean_stop(self) -> bool:
        """A stop during a trial is not counted as a crash only when the trial model was seen to work:
        not stalled, and either it inferred frames or no frames arrived at all."""
        if self.health.stalled:
            return False
        if self.health.trial_frames() > 0 or self._progress is None:
            return True
        try:
            captured = int(self._progress()[0])
        except Exception:  # noqa: BLE001
            return False
        return captured <= self._captured_at_trial

    # ---- public helpers (tests, CLI-in-process, model.path bundles) ----
    def install_bytes(self, data: Any, *, source: str = "", manual: bool = True) -> bool:
        """Verify, stage, self-test and hot-swap ``data`` in the calling thread. False = nothing to do."""
        try:
            with self.updater.locked(wait_s=LOCK_WAIT_S):
                slot = self.updater.prepare(data, source=source, manual=manual)
                self._switch(slot.name, verify=False)
        except NothingToDo as exc:
            log.info("%s", exc)
            return False
        return True

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
                self._tick()
            except KestrelError as exc:
                log.warning("update refused: %s", exc)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("updater worker error")
                self._settle_after_error()

    def _tick(self) -> None:
        verdict = self.health.check_time()
        if verdict is None and self._progress is not None:
            captured, processed, _done = self._progress()
            verdict = self.health.check_progress(captured, processed)
        if verdict is not None:
            self._on_verdict(verdict)
        req = self.updater.take_request()
        if req is not None:
            self._on_request(req)
        self._close_retired()
        if self._retry is not None and time.monotonic() >= self._retry[0]:
            desired = self._retry[1]
            self._retry = None
            self._on_desired_state(desired)

    def _settle_after_error(self) -> None:
        """An unexpected error in the middle of an update: never leave DOWNLOADING & co. behind."""
        try:
            self.updater.state.reload()
            if self.updater.state.state in st.IN_PROGRESS:
                self.updater.slots.clean_staging()
                self.updater._transition(st.FAILED, reason="internal error during the update (see the log); "
                                                           "the running model was kept", pending_slot=None)
        except Exception:  # noqa: BLE001
            log.exception("could not record the failed update")

    def _retire(self, model: Any) -> None:
        if model is not None:
            self._retired.append((model, self._observed))

    def _close_retired(self) -> None:
        """Close swapped-out models once the inference thread has been seen using another model
        (a result of a different model observed after the swap): it is then done with them."""
        keep = []
        for m, n in self._retired:
            if self._observed > n and self._last_ref is not None and self._last_ref is not m.ref:
                m.close()
            else:
                keep.append((m, n))
        self._retired = keep

    def _judge_threshold(self) -> float:
        """The confidence threshold in force before the switch: the trial is judged by it."""
        configured = self.cfg.sampler.confidence_threshold
        if configured is not None:
            return float(configured)
        current = self.holder.get() if self.holder is not None else None
        value = getattr(current, "default_threshold", None) if current is not None else None
        return DEFAULT_THRESHOLD if value is None else float(value)

    def _switch(self, slot_name: str, *, verify: bool = True) -> None:
        """Load the staged slot, persist TRIAL, flip the pointer, hot-swap; keep the old model loaded."""
        slot = self.updater.slots.slot(slot_name)
        if slot is None:
            raise UpdateBusy(f"slot {slot_name} vanished before the switch")
        model = self.updater.load_slot(slot, verify=verify)
        threshold = self._judge_threshold()
        baseline = self.health.baseline(threshold)
        factory = self.updater.slots.active() is None
        self.updater.begin_trial(slot_name, baseline=baseline, boot_count=1, judge_threshold=threshold)
        previous = self.holder.swap(model) if self.holder is not None else None
        self._retire(self._previous_model)
        self._previous_model = previous
        self._previous_is_factory = factory and previous is not None
        if self._progress is not None:
            self._captured_at_trial = int(self._progress()[0])
        self.health.begin_trial(model.ref, baseline, threshold)
        if self.cfg.update.trial_frames <= 0 and self.cfg.update.trial_seconds <= 0:
            self._on_verdict(("commit", "no trial configured"))

    def _on_verdict(self, verdict: Tuple[str, str]) -> None:
        what, reason = verdict
        self.updater.state.reload()
        if self.updater.state.state != st.TRIAL:
            self.health.end_trial()
            return
        if what == "commit":
            with self.updater.locked(wait_s=LOCK_WAIT_S):
                self.updater.commit(reason)
            self.health.end_trial(keep_baseline=True)
            self._retire(self._previous_model)
            self._previous_model = None
        else:
            stalled = self.health.stalled
            self._rollback(reason)
            if stalled and self.on_stall is not None:
                self.on_stall(reason)  # the inference thread is stuck inside the old model: restart
        self._after_trial()

    def _after_trial(self) -> None:
        if self._pending_desired is not None:
            desired, self._pending_desired = self._pending_desired, None
            self._q.put(("desired", desired))

    def _rollback(self, reason: str) -> bool:
        """Hot-swap to where Updater.rollback_plan says (the previous committed slot's model, or for a
        model on trial with none, the factory model), then persist the rollback. A failed trial with
        nothing to go back to ends in a terminal FAILED. NoRollbackTarget (nothing changed) outside a trial."""
        with self.updater.locked(wait_s=LOCK_WAIT_S):
            self.updater.state.reload()
            in_trial = self.updater.state.state == st.TRIAL
            try:
                slot = self.updater.rollback_plan()
            except NoRollbackTarget as exc:
                if not in_trial:
                    raise
                self.health.end_trial()
                self.updater.give_up_trial(f"{reason}: {exc}")
                log.error("trial failed (%s) and there is nothing to go back to: %s", reason, exc)
                return False
            model = self._previous_model
            self._previous_model = None
            if slot is None:
                if model is None or not self._previous_is_factory:  # e.g. the daemon restarted mid-trial
                    from edge.daemon import initial_model

                    self._retire(model)
                    model = initial_model(self.cfg)
            elif model is None or getattr(model.ref, "sha256", None) != slot.model_sha256:
                self._retire(model)
                model = self.updater.load_slot(slot, verify=False)  # rollback_plan re-verified it
            self._retire(self.holder.swap(model) if self.holder is not None else None)
            self.health.end_trial()
            if slot is None:
                self.updater.rollback(f"{reason} (back to the factory model)", to_factory=True)
                log.warning("rolled back to the factory model: %s", reason)
                return True
            self.updater.rollback(reason, target=slot)
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
            with self.updater.locked(wait_s=LOCK_WAIT_S):
                self._switch(slot, verify=True)  # staged by another process: re-verify it
        elif action == "rollback":
            try:
                self._rollback(str(req.get("reason") or "manual rollback (kestrel-edge rollback)"))
            except NoRollbackTarget as exc:
                log.warning("rollback refused: %s", exc)
            self._after_trial()
        else:
            log.warning("unknown control request %r", action)

    def _on_desired_state(self, desired: Any) -> None:
        key = (desired.model_name, int(desired.version), bool(desired.rollback), int(desired.issued_ms),
               int(getattr(desired, "rollback_from_version", 0)))
        if key == self._handled_desired:
            return
        if desired.rollback:  # acts at once, also on a model on trial
            self._handled_desired = key
            self._fleet_rollback(desired)
            return
        if self.updater.state.state in (st.TRIAL, st.ROLLING_BACK):
            log.info("desired %s v%d waits for the current trial to finish", desired.model_name,
                     int(desired.version))
            self._pending_desired = desired
            return
        self._handled_desired = key
        name, version = desired.model_name, int(desired.version)
        try:
            self.updater.admit(name, version)  # the rules prepare applies again to the verified bytes
        except NothingToDo:
            return  # equal: nothing to do
        except BundleError as exc:
            log.warning("desired %s v%d not fetched: %s", name, version, exc)
            return
        self._fetch_and_install(desired)

    def _grpc_target(self, desired: Any) -> str:
        """The registry to fetch from: the desired state's grpc_target only when it is one of ours."""
        u = self.cfg.update
        asked = str(desired.grpc_target or "")
        if asked and (asked == u.hub_grpc or asked in u.grpc_targets):
            return asked
        if asked:
            log.warning("ignoring grpc_target %r from a desired-state message: it is neither [update] hub_grpc "
                        "nor listed in [update] grpc_targets", asked)
        return str(u.hub_grpc or "")

    def _fetch_and_install(self, desired: Any) -> None:
        from edge.bundle import read_bounded
        from edge.updater.fetch import fetch_bundle

        name, version = desired.model_name, int(desired.version)
        u = self.cfg.update
        target = self._grpc_target(desired)
        with self.updater.locked(wait_s=LOCK_WAIT_S):
            self.updater._transition(st.DOWNLOADING, reason=f"from {target or '(no hub address)'}",
                                     model_name=name, target_version=version)
            try:
                part = fetch_bundle(target, name, version, downloads=self.updater.downloads,
                                    sha256=desired.sha256, size=int(desired.size),
                                    max_bundle_bytes=u.max_bundle_bytes, stop=self._stop)
                data = read_bounded(part, u.max_bundle_bytes)
                part.unlink()
            except (KestrelError, OSError) as exc:
                reject = getattr(exc, "reason", "") == "too_large"
                self.updater._transition(st.FAILED, reason=f"download failed: {exc}", reject=reject)
                if not reject and not self._stop.is_set():
                    self._retry = (time.monotonic() + self._retry_delay, desired)
                    self._retry_delay = min(self._retry_delay * 2, RETRY_DESIRED_MAX_S)
                    self._handled_desired = None
                return
            self._retry_delay = RETRY_DESIRED_S
            try:
                slot = self.updater.prepare(data, source=f"hub {name} v{version}", expect=(name, version))
            except NothingToDo:  # the installed version was checked before the fetch: this is not v{version}
                self.updater._transition(st.FAILED, reason=f"refused (not_desired): the hub announced {name} "
                                                           f"v{version} but sent the installed version")
                return
            except KestrelError as exc:  # refused: recorded as FAILED (and rejected when its self-test failed)
                log.warning("update to %s v%d refused: %s", name, version, exc)
                return
            del data
            self._switch(slot.name, verify=False)

    def _fleet_rollback(self, desired: Any) -> None:
        """A hub-ordered rollback: applied at most once per issued_ms, only when the device runs the
        version the message rolls back from, only to its own committed previous slot. Handled (never
        looked at again) once applied, found not to apply, or refused for want of a target; any other
        failure (the CLI holds the update lock, the previous model does not load) is retried."""
        issued = int(desired.issued_ms)
        last = int(self.updater.state.get("fleet_rollback_ms", 0) or 0)
        if issued <= last:
            log.info("fleet rollback issued at %d already handled (last %d): ignored", issued, last)
            return
        frm = int(getattr(desired, "rollback_from_version", 0))
        active = self.updater.slots.active()
        if frm <= 0:
            log.warning("fleet rollback ignored: it names no version to roll back from (update the hub)")
        elif active is None or active.version != frm or (desired.model_name and
                                                          desired.model_name != active.model_name):
            log.info("fleet rollback from %s v%d does not apply: this device runs %s", desired.model_name,
                     frm, f"{active.model_name} v{active.version}" if active else "no installed model")
        else:
            try:
                self._rollback(f"fleet rollback from v{frm} ordered by the hub")
            except NoRollbackTarget as exc:
                log.warning("fleet rollback from v%d refused: %s", frm, exc)
            except (KestrelError, OSError) as exc:
                self._handled_desired = None
                self._retry = (time.monotonic() + self._retry_delay, desired)
                log.warning("fleet rollback from v%d failed, retried in %.0f s: %s", frm, self._retry_delay, exc)
                self._retry_delay = min(self._retry_delay * 2, RETRY_DESIRED_MAX_S)
                return
            self._retry_delay = RETRY_DESIRED_S
            self._after_trial()
        self.updater.state.update(fleet_rollback_ms=issued)
