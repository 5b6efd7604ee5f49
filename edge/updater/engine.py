"""The updater's IO layer: turns verified bundles into slots and switches between them.

Verification is pure (proto.bundle.verify_bundle); this module feeds it what the device knows (the
trusted keys, the expected model name, the per-model version floor, a clock it can believe) and
does the writes, the self-test, the pointer switch, the rollbacks and the boot-count rule, keeping
the state file (edge.updater.state). The daemon's UpdateService and the ``kestrel-edge
install|rollback|status`` commands both go through it (the update lock and the CLI's requests to a
running daemon are in edge.updater.control; the read-only reports in edge.updater.report). Rules
(docs/updates.md):

* a rollback only ever goes to the device's own previous slot whose bundle was **committed**
  there, re-verified against today's trusted keys; it never installs bytes;
* ROLLING_BACK is persisted before the pointer moves, so a crash mid-rollback finishes it at boot;
* the version floor (highest version ever switched to) is raised at every switch, never lowered.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

from edge.config import EdgeConfig, ModelConfig, UpdateConfig
from edge.errors import NoRollbackTarget, NothingToDo
from edge.updater import slots as slots_mod
from edge.updater import state as st
from edge.updater.control import UpdateBusy, UpdateLock
from edge.updater.selftest import run_self_test
from edge.updater.slots import Slot, SlotError, SlotStore
from proto.clock import now_ms
from proto.errors import ArtifactError, BundleError, KestrelError

log = logging.getLogger("kestrel.updater")

Listener = Callable[[Dict[str, Any]], None]
Mutator = Callable[[Dict[str, Any]], None]  # changes the freshly read state record in place

# The device's clock is never believed below this (2026-01-01T00:00:00Z): a device without a
# real-time clock that boots at 1970 counts its clock as unset (see docs/threat-model.md).
BUILD_TIME_FLOOR_S = 1767225600.0




class Updater:
    def __init__(self, update: UpdateConfig, model: ModelConfig, data_dir: Path, trust_dir: Path, *,
                 listener: Optional[Listener] = None) -> None:
        self.update_cfg = update
        self.model_cfg = model  # the runtime and threads a slot's model is loaded with
        self.data_dir = Path(data_dir)
        self.dir = self.data_dir / "update"
        self.state = st.StateFile(self.dir / "state.json")
        self.slots = SlotStore(self.data_dir)
        self.trust = str(trust_dir)
        self.listener = listener
        self.downloads = self.data_dir / "downloads"
        self.lock = UpdateLock(self.dir)

    @classmethod
    def from_config(cls, cfg: EdgeConfig, *, listener: Optional[Listener] = None) -> Updater:
        """The updater of a device configured by ``cfg`` (the CLI's and the daemon's way to build one)."""
        return cls(cfg.update, cfg.model, cfg.data_dir, cfg.trust_dir, listener=listener)

    # ---- helpers ----
    def _transition(self, state: str, **kw: Any) -> Dict[str, Any]:
        snap = self.state.transition(state, **kw)
        if self.listener is not None:
            try:
                self.listener(snap)
            except Exception:  # noqa: BLE001 - reporting must never break an update
                log.exception("update status report failed")
        return snap

    def locked(self, wait_s: float = 0.0) -> ContextManager[None]:
        """Exclusive right to change slots (CLI and daemon worker): edge.updater.control.UpdateLock.
        ``wait_s`` = 0: UpdateBusy at once when held elsewhere; else wait up to that long for it.
        Re-entrant within one thread."""
        return self.lock.locked(wait_s)

    def trusted_keys(self) -> Any:
        """The trust store as of now (KeyFileError, an ArtifactError, when it cannot be loaded)."""
        from proto.keys import load_public_keys

        return load_public_keys(self.trust)

    def installed_version(self) -> int:
        active = self.slots.active()
        return active.version if active else 0

    def expected_model(self) -> Optional[str]:
        """The model name a bundle must carry: the configured one, else the active slot's, else any."""
        if self.update_cfg.model_name:
            return str(self.update_cfg.model_name)
        active = self.slots.active()
        return active.model_name if active else None

    def clock(self) -> Tuple[float, bool]:
        """(now, clock_set): the wall clock, or the persisted time floor when the clock is below it
        (an unset or set-back clock: then ``not_yet_valid`` cannot be judged)."""
        floor = max(BUILD_TIME_FLOOR_S, float(self.state.get("time_floor_s", 0.0) or 0.0))
        wall = time.time()
        if wall >= floor:
            return wall, True
        return floor, False

    # ---- slot outcomes (what became of the bundle in each slot) ----
    def outcome(self, slot: Optional[Slot]) -> str:
        if slot is None:
            return ""
        rec = (self.state.get("slots") or {}).get(slot.name) or {}
        if rec.get("bundle_sha256") != slot.record.get("bundle_sha256"):
            return ""  # the slot was re-staged since: nothing known about this bundle
        return str(rec.get("outcome", ""))

    @staticmethod
    def _set_outcome(slot: Slot, outcome: str) -> Mutator:
        """A state change (for ``transition(mutate=...)``) recording ``outcome`` for the bundle in ``slot``."""
        def mark(data: Dict[str, Any]) -> None:
            data.setdefault("slots", {})[slot.name] = {
                "bundle_sha256": slot.record.get("bundle_sha256", ""), "model_name": slot.model_name,
                "version": slot.version, "outcome": outcome}

        return mark

    def check_slot(self, slot: Slot, trusted: Any = None) -> None:
        """Files against slot.json and the slot's signed manifest against today's trusted keys."""
        if trusted is None:
            trusted = self.trusted_keys()
        self.slots.check(slot, trusted=trusted)

    # ---- the install path ----
    def verify(self, data: Any, *, new_model: bool = False) -> Any:
        """Pure verification against the trusted keys, expected model, installed version and floor."""
        from proto.bundle import verify_bundle

        u = self.update_cfg
        expected = None if new_model else self.expected_model()
        installed = self.slots.active()
        floor = 0
        if expected is not None:
            floor = self.state.floor(expected)
        now, clock_set = self.clock()
        try:
            vb = verify_bundle(data, self.trusted_keys(), installed_version=installed.version
                               if installed is not None and installed.model_name == expected else 0,
                               version_floor=floor, expected_model=expected, now=now,
                               clock_slack_s=u.clock_slack_s, clock_set=clock_set,
                               max_bundle_bytes=u.max_bundle_bytes)
        except BundleError as exc:
            if exc.reason == "same_version":
                raise NothingToDo(f"version {self.installed_version()} is already installed; "
                                  "nothing to do") from exc
            raise
        return vb

    def admit(self, name: str, version: int, *, manual: bool = False, new_model: bool = False) -> None:
        """Whether this device takes model ``name`` ``version``: the one set of rules desired state
        applies before a download and prepare applies again to verified bytes (where the verifier has
        checked the same against the signed manifest). NothingToDo: that version is installed.
        BundleError: ``bad_manifest`` (no valid name/version), ``wrong_model`` (another model, unless
        ``new_model``: then that model's own floor applies), ``downgrade`` (at or below the installed
        version or the model's floor), ``rejected`` (given up on before; ``manual``, an operator's
        install, may retry it)."""
        from proto.bundle import MAX_VERSION, refuse, valid_model_name

        if not valid_model_name(name) or not 1 <= version <= MAX_VERSION:
            raise refuse("bad_manifest", f"{name!r} v{version} is not a valid model name and version")
        expected = None if new_model else self.expected_model()
        if expected is not None and name != expected:
            raise refuse("wrong_model", f"{name} v{version}: this device runs {expected!r} (a different model "
                                        "is installed only on purpose: see docs/updates.md)")
        active = self.slots.active()
        installed = active.version if active is not None and active.model_name == name else 0
        if version == installed:
            raise NothingToDo(f"version {version} is already installed; nothing to do")
        floor = max(installed, self.state.floor(name))
        if version <= floor:
            raise refuse("downgrade", f"{name} v{version} is at or below v{floor}, the highest version of it "
                                      "this device has run")
        rejected = self.state.is_rejected(name, version)
        if rejected and not manual:
            raise BundleError(f"bundle refused: rejected: {name} v{version} was refused before ({rejected})",
                              reason="rejected")

    def prepare(self, data: Any, *, source: str = "", manual: bool = False,
                expect: Optional[Tuple[str, int]] = None, new_model: bool = False) -> Slot:
        """VERIFIED -> STAGED -> SELF_TEST for bundle bytes; returns the staged, self-tested slot.

        Caller holds ``locked()``. ``expect`` (name, version): what the hub's desired state announced;
        the signed manifest must say exactly that. ``manual`` (an operator's `kestrel-edge install`)
        may install a version desired state gave up on (rejected list); the floor still applies.
        Refusals raise with a one-line reason, are recorded as FAILED, and leave the active slot alone.
        """
        if self.state.state in (st.TRIAL, st.ROLLING_BACK):
            raise UpdateBusy("an update is on trial; wait for it to commit, or run `kestrel-edge rollback`")
        try:
            verified = self.verify(data, new_model=new_model)
            man = verified.manifest
            if expect is not None and (man.model_name, man.version) != (expect[0], int(expect[1])):
                raise BundleError(f"bundle refused: not_desired: the hub announced {expect[0]} v{expect[1]} "
                                  f"but sent {man.model_name} v{man.version}", reason="not_desired")
            self.admit(man.model_name, man.version, manual=manual, new_model=new_model)
        except NothingToDo:
            raise
        except BundleError as exc:
            self._transition(st.FAILED, reason=f"refused ({exc.reason}): {exc}", model_name="",
                             target_version=0)
            raise
        except KestrelError as exc:  # the trust store cannot be loaded: say so, keep the model
            self._transition(st.FAILED, reason=f"refused: {exc}", model_name="", target_version=0)
            raise
        name, version = man.model_name, man.version
        self._transition(st.VERIFIED, reason=source, model_name=name, target_version=version)
        target = self.slots.target_for_staging()
        try:
            self.slots.clean_staging()
            slot = self.slots.stage(target, verified, data)
        except (OSError, KestrelError) as exc:
            self._transition(st.FAILED, reason=f"staging failed: {exc}")
            raise ArtifactError(f"could not stage {name} v{version}: {exc}") from exc
        del verified  # views into ``data``: nothing of the bundle stays referenced from here
        self._transition(st.STAGED, reason=f"slot {target}", mutate=self._set_outcome(slot, st.OUT_STAGED))
        self._transition(st.SELF_TEST, reason=f"slot {target}")
        u = self.update_cfg
        try:
            model = self.load_slot(slot, verify=False)  # just staged from verified bytes
            try:
                figs = run_self_test(model, man.self_test, latency_budget_ms=u.self_test_latency_ms,
                                     min_cases=u.self_test_min_cases, max_tolerance=u.self_test_max_tolerance)
            finally:
                model.close()
        except KestrelError as exc:
            self._transition(st.FAILED, reason=f"self-test failed: {exc}", reject=True,
                             mutate=self._set_outcome(slot, st.OUT_SELFTEST_FAILED))
            raise
        self.state.update(pending_slot=target, self_test=figs)
        log.info("self-test of %s v%s passed: %s", name, version, figs)
        return slot

    def load_slot(self, slot: Slot, *, verify: bool = True, trusted: Any = None) -> Any:
        """Check the slot (files, and its signature against today's keys unless ``verify=False``) and
        load its model with the edge runtime."""
        from edge.inference.runtime import load_model
        from proto.inputspec import InputSpec

        if verify:
            self.check_slot(slot, trusted)
        else:
            self.slots.check(slot)
        spec = InputSpec.from_dict(slot.input_spec) if slot.input_spec else None
        m = self.model_cfg
        model = load_model(str(slot.model_path), labels=slot.labels or None, spec=spec, runtime=m.runtime,
                           threads=m.resolved_threads, name=slot.model_name, version=slot.version)
        model.default_threshold = slot.record.get("default_threshold")  # the sampler follows the bundle's default
        return model

    def begin_trial(self, slot_name: str, *, baseline: Optional[Dict[str, float]], boot_count: int,
                    judge_threshold: Optional[float] = None) -> None:
        """Persist TRIAL (with the rollback target and the slot's outcome), flip the pointer, then
        raise the version floor (the model has run from the flip on: a crash before the floor is
        written is repaired at boot, by boot_slot or _finish_rollback)."""
        slot = self.slots.slot(slot_name)
        if slot is None:
            raise SlotError(f"slot {slot_name} is empty; nothing to switch to")
        previous = self.slots.active_name()
        prev_slot = self.slots.slot(previous) if previous else None
        if prev_slot is not None and self.outcome(prev_slot) != st.OUT_COMMITTED:
            previous = None  # never a rollback target: a rollback goes to a committed slot only

        self._transition(st.TRIAL, reason="", pending_slot=None, model_name=slot.model_name,
                         target_version=slot.version, trial={
                             "slot": slot_name, "previous_slot": previous, "boot_count": boot_count,
                             "started_ms": now_ms(), "baseline": baseline,
                             "judge_threshold": judge_threshold}, mutate=self._set_outcome(slot, st.OUT_TRIAL))
        self.slots.switch(slot_name)
        st.crash_point("SWITCHED")
        self.raise_floors(slot)

    def raise_floors(self, slot: Slot) -> None:
        """The slot's version becomes the model's version floor and its signed creation time the time
        floor (when higher): the device has run it, so nothing at or below it is installed again."""
        created = _slot_created(slot)
        snap = self.state.snapshot()
        if (int((snap.get("floors") or {}).get(slot.model_name, 0)) >= slot.version
                and float(snap.get("time_floor_s", 0.0) or 0.0) >= created):
            return
        self.state.modify(self._raise_floors(slot))

    @staticmethod
    def _raise_floors(slot: Slot) -> Mutator:
        """The state change of raise_floors (for ``transition(mutate=...)``)."""
        created = _slot_created(slot)

        def mark(d: Dict[str, Any]) -> None:
            floors = d.setdefault("floors", {})
            floors[slot.model_name] = max(int(floors.get(slot.model_name, 0)), slot.version)
            d["time_floor_s"] = max(float(d.get("time_floor_s", 0.0) or 0.0), created)

        return mark

    def commit(self, reason: str = "") -> None:
        active = self.slots.active()
        self._transition(st.COMMITTED, reason=reason, trial=None,
                         mutate=self._set_outcome(active, st.OUT_COMMITTED) if active is not None else None)

    def rollback_target(self, *, verify: bool = True) -> Slot:
        """The slot a rollback goes to, re-verified (unless ``verify=False``: for display);
        NoRollbackTarget (saying why) when there is none.

        On trial: the slot the trial started from, if its bundle was committed. Otherwise: the other
        slot, if its bundle was committed and is an older version of the same model.
        """
        active = self.slots.active()
        trial = self.state.trial if self.state.state == st.TRIAL else None
        if trial is not None:
            name = trial.get("previous_slot")
            if not name:
                raise NoRollbackTarget("the model on trial has no committed previous model to go back to")
            slot = self.slots.slot(str(name))
            if slot is None or self.outcome(slot) != st.OUT_COMMITTED:
                raise NoRollbackTarget(f"slot {name} no longer holds the committed model the trial started from")
        else:
            if active is None:
                raise NoRollbackTarget("no model is installed")
            slot = self.slots.slot(slots_mod.other(active.name))
            if slot is None:
                raise NoRollbackTarget("there is no previous model slot")
            outcome = self.outcome(slot)
            if outcome != st.OUT_COMMITTED:
                raise NoRollbackTarget(f"the other slot holds {slot.model_name} v{slot.version}, which was "
                                       f"never committed on this device ({outcome or 'unknown'}); refusing "
                                       "to switch to it")
            if slot.model_name != active.model_name or slot.version >= active.version:
                raise NoRollbackTarget(f"the other slot holds {slot.model_name} v{slot.version}, not an older "
                                       f"version of the running {active.model_name} v{active.version}")
        if not verify:
            return slot
        try:
            self.check_slot(slot)
        except (SlotError, ArtifactError) as exc:
            raise NoRollbackTarget(f"the previous model cannot be used: {exc}") from exc
        return slot

    def rollback_plan(self) -> Optional[Slot]:
        """Where a rollback goes (the one rule for the daemon, the boot and the CLI): the committed
        previous slot, re-verified; else, for a model on trial, the factory model (None) when
        allowed; else NoRollbackTarget, saying why (nothing is changed)."""
        try:
            return self.rollback_target()
        except NoRollbackTarget:
            if self.state.state == st.TRIAL and self.factory_allowed():
                return None
            raise

    def rollback(self, reason: str, *, target: Optional[Slot] = None, to_factory: bool = False) -> Optional[Slot]:
        """Persist ROLLING_BACK, move the pointer back (or clear it: the factory model), persist
        ROLLED_BACK. Returns the target slot (None for the factory model). NoRollbackTarget when
        there is nothing to go back to (nothing is changed then)."""
        slot = None if to_factory else (target or self.rollback_target())
        current = self.slots.active()
        self._transition(st.ROLLING_BACK, reason=reason, rolling_back={
            "from_slot": current.name if current else None, "to_slot": slot.name if slot else None,
            "reason": reason},
            **({"model_name": current.model_name, "target_version": current.version} if current else {}))
        return self._finish_rollback()

    def _finish_rollback(self) -> Optional[Slot]:
        """Complete a persisted ROLLING_BACK (also at boot, after a crash in the middle)."""
        rb = self.state.get("rolling_back") or {}
        to = rb.get("to_slot")
        from_slot = self.slots.slot(str(rb["from_slot"])) if rb.get("from_slot") else None
        if to:
            self.slots.switch(str(to))
        else:
            self.slots.clear_pointer()
        st.crash_point("ROLLBACK_SWITCHED")

        def mark(d: Dict[str, Any]) -> None:
            # the slot left ran (maybe crashed before begin_trial raised its floor): its version is never
            # installed again, and its slot is never a rollback target. A crash before this write leaves
            # ROLLING_BACK persisted: the next boot finishes the rollback and makes it then.
            if from_slot is not None:
                self._raise_floors(from_slot)(d)
                self._set_outcome(from_slot, st.OUT_REJECTED)(d)

        self._transition(st.ROLLED_BACK, reason=str(rb.get("reason", "")), trial=None, rolling_back=None,
                         mutate=mark)
        return self.slots.slot(str(to)) if to else None

    def give_up_trial(self, reason: str) -> None:
        """A failed trial with nothing to go back to: a terminal FAILED (the model keeps running; its
        slot is never a rollback target, and its version is at the floor: desired state does not retry it)."""
        active = self.slots.active()
        self._transition(st.FAILED, reason=f"{reason}; there is no previous model to go back to, so it keeps "
                                           "running: deploy a newer version", trial=None,
                         mutate=self._set_outcome(active, st.OUT_REJECTED) if active is not None else None)

    # ---- boot ----
    def boot_slot(self) -> Optional[Slot]:
        """The slot to start on, after settling an interrupted update (see docs/updates.md); None when
        no slot is active (the factory model, if allowed). Caller holds ``locked()``."""
        snap = self.state.snapshot()
        state = snap["state"]
        if state in st.IN_PROGRESS:
            self.slots.clean_staging()
            self._transition(st.FAILED, reason=f"interrupted during {state}; the running model was kept",
                             pending_slot=None, crash=False)
        elif state == st.ROLLING_BACK:
            log.warning("finishing a rollback interrupted by a crash")
            self._finish_rollback()
        elif state == st.TRIAL:
            self._boot_in_trial(snap)
        slot = self.slots.active()
        if slot is None:
            if self.slots.pointer.exists():
                log.error("the active slot %s has no readable record", self.slots.active_name())
            return None
        try:
            trusted = self.trusted_keys()
        except KestrelError as exc:
            self._transition(st.FAILED, reason=f"installed models cannot be re-verified: {exc}", crash=False)
            raise
        try:
            self.check_slot(slot, trusted)
            self.raise_floors(slot)
            return slot
        except SlotError as exc:
            log.error("active slot cannot be used (%s)", exc)
            alt = self.slots.slot(slots_mod.other(slot.name))
            why = str(exc)
            if alt is not None and self.outcome(alt) == st.OUT_COMMITTED:
                try:
                    self.check_slot(alt, trusted)
                except SlotError as exc2:
                    why += f"; the other slot cannot be used either ({exc2})"
                else:
                    self.slots.switch(alt.name)
                    self._transition(st.FAILED, reason=f"active slot unusable ({exc}); switched to the "
                                                       f"committed slot {alt.name}", trial=None, crash=False,
                                     mutate=self._raise_floors(alt))
                    return alt
            self._transition(st.FAILED, reason=f"no usable signed model ({why})", trial=None, crash=False)
            raise SlotError(f"no usable signed model: {why}") from exc

    def _boot_in_trial(self, snap: Dict[str, Any]) -> None:
        trial = snap.get("trial") or {}
        active = self.slots.active_name()
        if active != trial.get("slot"):
            self._transition(st.FAILED, trial=None, crash=False,
                             reason="interrupted before the switch; the running model was kept")
            return
        starts = int(trial.get("boot_count", 0))
        if starts < int(self.update_cfg.max_boot_attempts):
            trial["boot_count"] = starts + 1
            self.state.update(trial=trial)
            return
        why = f"the daemon stopped {starts} time(s) during the trial; rolled back at boot"
        log.warning("trial model crashed %d time(s); rolling back before loading it", starts)
        try:
            target = self.rollback_plan()
        except NoRollbackTarget as exc:
            self.give_up_trial(f"{why}: {exc}")
            return
        self.rollback(why if target is not None else f"{why} (back to the factory model)", target=target,
                      to_factory=target is None)

    def factory_allowed(self) -> bool:
        """A factory model (model.path, a bare .tflite) may run when no slot is active."""
        p = str(self.model_cfg.path or "")
        return bool(self.update_cfg.allow_unsigned_factory) and p.endswith(".tflite")


def _slot_created(slot: Slot) -> float:
    """The signed ``created`` time of the bundle in ``slot`` (0 when unknown): from slot.json, which
    has it since it is staged; a slot staged before that reads it from its manifest.json."""
    from proto.bundle import MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_TIME_S, read_bounded

    created = slot.record.get("created")
    if created is None:
        try:
            doc = json.loads(read_bounded(slot.path / MANIFEST_NAME, MAX_MANIFEST_BYTES))
        except (BundleError, ValueError):
            return 0.0
        created = doc.get("created", 0) if isinstance(doc, dict) else 0
    ok = isinstance(created, (int, float)) and not isinstance(created, bool) and 0 <= created <= MAX_TIME_S
    return float(created) if ok else 0.0
