"""The seam between the daemon and the updater; the daemon (edge/daemon.py) calls exactly these methods.

Lifecycle inside ``kestrel-edge run``::

    svc = UpdateService.from_config(cfg, publisher, holder, stats)
    model = svc.boot_model()      # the model to start on (active slot; boot-count rollback), or None
    svc.start()                   # follow desired state (MQTT), start background work
    svc.attach_pipeline(progress, on_stall)   # pipeline counters for the hung-model check
    ... for every inference: svc.observe(result)   # trial health watch
    svc.version_manifest()        # -> proto VersionManifest for status messages
    svc.stop()

All slow work (download, verify, stage, self-test, switch, rollback) runs in one background worker
thread; ``observe`` only appends to the health watch and wakes the worker when a verdict is due.
The CLI talks to a running daemon through ``{data_dir}/update/control.json`` (polled every
CONTROL_POLL_S; edge.updater.control); see docs/updates.md. Desired-state messages from the hub
are followed by the service's edge.updater.desired.DesiredFollower, on the same worker thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from edge.config import DeviceConfig, EdgeConfig, ModelConfig, UpdateConfig
from edge.updater import report
from edge.updater import state as st
from edge.updater.control import LOCK_WAIT_S, DaemonLock, UpdateBusy, take_request
from edge.updater.desired import DesiredFollower
from edge.updater.engine import NoRollbackTarget, NothingToDo, Updater
from edge.updater.factory import load_factory_model
from edge.updater.health import DEFAULT_THRESHOLD, HealthWatch, TrialCriteria
from proto.clock import now_ms
from proto.errors import KestrelError

if TYPE_CHECKING:
    from edge.uplink.publisher import Publisher

log = logging.getLogger("kestrel.updater")

CONTROL_POLL_S = 0.5

Progress = Callable[[], Tuple[int, int, bool]]  # (frames captured, frames inferred, pipeline done)


def criteria_from(u: UpdateConfig) -> TrialCriteria:
    return TrialCriteria(frames=u.trial_frames, seconds=u.trial_seconds,
                         max_latency_ratio=u.trial_max_latency_ratio,
                         max_low_conf_rate=u.trial_max_low_conf_rate,
                         max_errors=u.trial_max_errors, latency_floor_s=u.trial_latency_floor_ms / 1000.0,
                         max_latency_s=u.trial_max_latency_ms / 1000.0,
                         max_low_conf_abs=u.trial_max_low_conf_abs, stall_s=u.trial_stall_s)


class UpdateService:
    def __init__(self, update: UpdateConfig, model: ModelConfig, device: DeviceConfig, data_dir: Path,
                 trust_dir: Path, *, configured_threshold: Optional[float], publisher: Optional[Publisher],
                 holder: Any, stats: Any, mqtt_ca_file: str = "") -> None:
        """``configured_threshold``: [sampler] confidence_threshold (None: each model's default), the
        threshold a trial is judged by when set; ``mqtt_ca_file``: the CA downloads verify the hub with
        when [update] ca_file is empty (EdgeConfig.hub_ca_file)."""
        self.update_cfg = update
        self.model_cfg = model
        self.device_id = device.resolved_id
        self.group = device.group
        self.configured_threshold = configured_threshold
        self.publisher = publisher
        self.holder = holder
        self.stats = stats
        self.updater = Updater(update, model, data_dir, trust_dir, listener=self._report)
        self.health = HealthWatch(criteria_from(update))
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
        self.desired = DesiredFollower(update, self.updater, queue_desired=lambda d: self._q.put(("desired", d)),
                                       switch=self._switch, rollback=self._rollback, stop=self._stop,
                                       on_refused=getattr(stats, "desired_refused", None), mqtt_ca_file=mqtt_ca_file)

    @classmethod
    def from_config(cls, cfg: EdgeConfig, publisher: Optional[Publisher], holder: Any, stats: Any) -> UpdateService:
        return cls(cfg.update, cfg.model, cfg.device, cfg.data_dir, cfg.trust_dir,
                   configured_threshold=cfg.sampler.confidence_threshold, publisher=publisher, holder=holder,
                   stats=stats, mqtt_ca_file=cfg.hub_ca_file)

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
                     int(trial.get("boot_count", 0)), self.update_cfg.max_boot_attempts)
        return model

    def start(self) -> None:
        """Subscribe to the desired-state topics and start background work."""
        if not self._lock.acquire():
            log.warning("another daemon holds %s; CLI requests may go to it", self._lock.path)
        if self.update_cfg.enabled and self.publisher is not None:
            from proto import topics

            dev = self.device_id
            self.publisher.subscribe(topics.device_desired(dev), self.desired.on_desired, topics.QOS_DESIRED)
            self.publisher.subscribe(topics.group_desired(self.group), self.desired.on_desired,
                                     topics.QOS_DESIRED)
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()

    def attach_pipeline(self, progress: Progress, on_stall: Optional[Callable[[str], None]] = None) -> None:
        """The pipeline's counters (for the hung-model check) and what to do when a trial model hangs
        (the daemon stops, and restarts on the rolled-back slot)."""
        self._progress = progress
        self.on_stall = on_stall

    def observe(self, result: Any) -> None:
        """Called by the inference loop after every frame (edge.pipeline.loop.InferenceResult)."""
        self._observed += 1
        self._last_ref = getattr(result, "model_ref", None)
        verdict = self.health.observe(result)
        if verdict is not None:
            self._q.put(("verdict", verdict))

    def version_manifest(self) -> Any:
        return report.manifest(self.updater)

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
        from proto import topics

        # the whole Status as the daemon builds it (software version, threshold in force ...), with the
        # versions as of this change
        msg = self.publisher.status_message(topics.STATE_ONLINE)
        msg.time_ms = now_ms()
        model = self.holder.get() if self.holder is not None else None
        if model is not None:
            msg.model.CopyFrom(model.ref)
        msg.versions.CopyFrom(report.manifest(self.updater))
        self.publisher.publish_status(msg)

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
                    self.desired.on_desired_state(arg)
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
        req = take_request(self.updater.dir)
        if req is not None:
            self._on_request(req)
        self._close_retired()
        self.desired.retry_if_due()

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
        configured = self.configured_threshold
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
        if self.update_cfg.trial_frames <= 0 and self.update_cfg.trial_seconds <= 0:
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
        self.desired.after_trial()

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
                    self._retire(model)
                    model = load_factory_model(self.model_cfg)
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
            self.desired.after_trial()
        else:
            log.warning("unknown control request %r", action)
