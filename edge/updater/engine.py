"""The updater's IO layer: turns verified bundles into slots and switches between them.

Verification is pure (edge.bundle.verify_bundle); this module does the writes, the self-test,
the pointer switch, the boot-count rollback, and keeps the state file. The daemon's
UpdateService and the ``kestrel-edge install|rollback|status`` commands both go through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from edge.errors import ArtifactError, BundleError, KestrelError
from edge.updater import slots as slots_mod
from edge.updater import state as st
from edge.updater.selftest import run_self_test
from edge.updater.slots import Slot, SlotError, SlotStore

log = logging.getLogger("kestrel.updater")

Listener = Callable[[Dict[str, Any]], None]


class UpdateBusy(ArtifactError):
    """Another update is in progress or on trial; nothing was changed."""


class NothingToDo(KestrelError):
    """The bundle's version is already installed (equal version): nothing to do."""


class Updater:
    def __init__(self, cfg: Any, *, trust: Optional[str] = None, listener: Optional[Listener] = None) -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.device.data_dir)
        self.dir = self.data_dir / "update"
        self.state = st.StateFile(self.dir / "state.json")
        self.slots = SlotStore(self.data_dir)
        self.trust = trust or str(cfg.trust_dir)
        self.listener = listener
        self.control_path = self.dir / "control.json"
        self.downloads = self.data_dir / "downloads"

    # ---- helpers ----
    def _transition(self, state: str, **kw: Any) -> Dict[str, Any]:
        snap = self.state.transition(state, **kw)
        if self.listener is not None:
            try:
                self.listener(snap)
            except Exception:  # noqa: BLE001 - reporting must never break an update
                log.exception("update status report failed")
        return snap

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive right to change slots (CLI and daemon worker); UpdateBusy when held elsewhere."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.dir / "update.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise UpdateBusy("another update is being installed right now; try again when it ends") \
                    from exc
            yield
        finally:
            os.close(fd)

    def trusted_keys(self) -> Any:
        from edge.keys import load_public_keys

        return load_public_keys(self.trust)

    def installed_version(self) -> int:
        active = self.slots.active()
        return active.version if active else 0

    # ---- the install path ----
    def verify(self, data: bytes) -> Any:
        """Pure verification against the trusted keys and the installed version; BundleError if refused."""
        from edge.bundle import verify_bundle

        u = self.cfg.update
        try:
            return verify_bundle(data, self.trusted_keys(), installed_version=self.installed_version(),
                                 now=time.time(), clock_slack_s=u.clock_slack_s,
                                 max_bundle_bytes=u.max_bundle_bytes)
        except BundleError as exc:
            if exc.reason == "same_version":
                raise NothingToDo(f"version {self.installed_version()} is already installed; "
                                  "nothing to do") from exc
            raise

    def prepare(self, data: bytes, *, source: str = "") -> Slot:
        """VERIFIED -> STAGED -> SELF_TEST for bundle bytes; returns the staged, self-tested slot.

        Caller holds ``locked()``. Refusals raise with a one-line reason and leave the active slot alone.
        """
        if self.state.state == st.TRIAL:
            raise UpdateBusy("an update is on trial; wait for it to commit, or run `kestrel-edge rollback`")
        try:
            verified = self.verify(data)
        except NothingToDo:
            raise
        except BundleError as exc:
            self._transition(st.FAILED, reason=f"refused ({exc.reason}): {exc}", model_name="",
                             target_version=0)
            raise
        man = verified.manifest
        name = str(slots_mod._get(man, "model_name"))
        version = int(slots_mod._get(man, "version"))
        self._transition(st.VERIFIED, reason=source, model_name=name, target_version=version)
        target = self.slots.target_for_staging()
        try:
            self.slots.clean_staging()
            slot = self.slots.stage(target, verified, data)
        except (OSError, KestrelError) as exc:
            self._transition(st.FAILED, reason=f"staging failed: {exc}")
            raise ArtifactError(f"could not stage {name} v{version}: {exc}") from exc
        self._transition(st.STAGED, reason=f"slot {target}")
        self._transition(st.SELF_TEST, reason=f"slot {target}")
        try:
            model = self.load_slot(slot)
            try:
                figs = run_self_test(model, slots_mod._get(man, "self_test", None),
                                     latency_budget_ms=self.cfg.update.self_test_latency_ms)
            finally:
                model.close()
        except KestrelError as exc:
            self._transition(st.FAILED, reason=f"self-test failed: {exc}", reject=True)
            raise
        self.state.update(pending_slot=target, self_test=figs)
        log.info("self-test of %s v%s passed: %s", name, version, figs)
        return slot

    def load_slot(self, slot: Slot) -> Any:
        """Check the slot's files against its hashes and load its model with the edge runtime."""
        from edge.inputspec import InputSpec
        from edge.runtime import load_model

        self.slots.check(slot)
        spec = InputSpec.from_dict(slot.input_spec) if slot.input_spec else None
        m = self.cfg.model
        model = load_model(str(slot.model_path), labels=slot.labels or None, spec=spec, runtime=m.runtime,
                           threads=m.threads, name=slot.model_name, version=slot.version)
        model.default_threshold = slot.record.get("default_threshold")  # the sampler follows the bundle's default
        return model

    def begin_trial(self, slot_name: str, *, baseline: Optional[Dict[str, float]], boot_count: int) -> None:
        """Persist TRIAL (with the rollback target), then flip the pointer."""
        previous = self.slots.active_name()
        self._transition(st.TRIAL, reason="", pending_slot=None, trial={
            "slot": slot_name, "previous_slot": previous, "boot_count": boot_count,
            "started_ms": int(time.time() * 1000), "baseline": baseline})
        self.slots.switch(slot_name)
        st.crash_point("SWITCHED")

    def commit(self, reason: str = "") -> None:
        self._transition(st.COMMITTED, reason=reason, trial=None)

    def rollback_target(self) -> Optional[Slot]:
        """The slot a rollback goes to (the trial's previous slot, else the other slot), checked; or None."""
        trial = self.state.trial
        if trial and trial.get("previous_slot"):
            target = str(trial["previous_slot"])
        else:
            active = self.slots.active_name()
            if active is None:
                return None
            target = slots_mod.other(active)
        slot = self.slots.slot(target)
        if slot is not None:
            self.slots.check(slot)
        return slot

    def rollback(self, reason: str, *, reject: bool = True, target: Optional[Slot] = None) -> Optional[Slot]:
        """Point back at the previous slot. Returns it, or None when there is nothing to go back to."""
        slot = target or self.rollback_target()
        if slot is None:
            return None
        current = self.slots.active()
        fields: Dict[str, Any] = {"trial": None}
        if current is not None and current.name != slot.name:
            fields.update(model_name=current.model_name, target_version=current.version)
        self.slots.switch(slot.name)
        self._transition(st.ROLLED_BACK, reason=reason, reject=reject, **fields)
        return slot

    # ---- boot ----
    def boot_slot(self) -> Optional[Slot]:
        """The slot to start on, after settling an interrupted update (see docs/updates.md)."""
        snap = self.state.snapshot()
        state = snap["state"]
        active = self.slots.active_name()
        if state in st.IN_PROGRESS:
            self.slots.clean_staging()
            self._transition(st.FAILED, reason=f"interrupted during {state}; the running model was kept",
                             pending_slot=None, crash=False)
        elif state == st.TRIAL:
            trial = snap.get("trial") or {}
            if active != trial.get("slot"):
                self._transition(st.FAILED, trial=None, crash=False,
                                 reason="interrupted before the switch; the running model was kept")
            else:
                starts = int(trial.get("boot_count", 0))
                if starts >= int(self.cfg.update.max_boot_attempts):
                    log.warning("trial model crashed %d time(s); rolling back before loading it", starts)
                    self.rollback(f"the daemon stopped {starts} time(s) during the trial; "
                                  "rolled back at boot")
                else:
                    trial["boot_count"] = starts + 1
                    self.state.update(trial=trial)
        slot = self.slots.active()
        if slot is None:
            return None
        try:
            self.slots.check(slot)
            return slot
        except SlotError as exc:
            log.error("active slot is damaged (%s); trying the other slot", exc)
            alt = self.slots.slot(slots_mod.other(slot.name))
            if alt is None:
                raise
            self.slots.check(alt)
            self.slots.switch(alt.name)
            self._transition(st.FAILED, reason=f"active slot damaged ({exc}); switched to slot {alt.name}",
                             trial=None, crash=False)
            return alt

    # ---- reporting ----
    def manifest(self) -> Any:
        from proto import kestrel_pb2

        self.state.reload()
        snap = self.state.snapshot()
        vm = kestrel_pb2.VersionManifest(update_state=snap["state"], reason=snap.get("reason", ""),
                                         target_version=int(snap.get("target_version") or 0),
                                         updated_ms=int(snap.get("updated_ms") or 0))
        active = self.slots.active()
        if active is not None:
            vm.installed.CopyFrom(slot_ref(active))
            prev = self.slots.slot(slots_mod.other(active.name))
            if prev is not None:
                vm.previous.CopyFrom(slot_ref(prev))
        return vm

    def status(self) -> Dict[str, Any]:
        snap = self.state.snapshot()
        out: Dict[str, Any] = {"state": snap["state"], "reason": snap.get("reason", ""),
                               "target": {"model_name": snap.get("model_name", ""),
                                          "version": snap.get("target_version", 0)},
                               "trial": snap.get("trial"), "active_slot": self.slots.active_name(),
                               "daemon_running": daemon_running(self.dir),
                               "history": snap.get("history", [])[-10:]}
        for label, slot in (("installed", self.slots.active()), ("previous", self.slots.inactive())):
            out[label] = None if slot is None else {
                "slot": slot.name, "model_name": slot.model_name, "version": slot.version,
                "model_sha256": slot.model_sha256, "installed_ms": slot.record.get("installed_ms", 0)}
        return out

    # ---- control requests from the CLI to a running daemon ----
    def request(self, action: str, **fields: Any) -> str:
        from edge import atomic

        rid = uuid.uuid4().hex
        atomic.write_json(self.control_path, dict(fields, action=action, id=rid, ms=int(time.time() * 1000)))
        return rid

    def take_request(self) -> Optional[Dict[str, Any]]:
        try:
            req = json.loads(self.control_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            req = None
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        return req if isinstance(req, dict) else None


def slot_ref(slot: Slot) -> Any:
    from proto import kestrel_pb2

    return kestrel_pb2.ModelRef(name=slot.model_name, version=slot.version, sha256=slot.model_sha256)


class DaemonLock:
    """Held by a running daemon for its lifetime; the CLI tests it to know whether to ask the daemon."""

    def __init__(self, update_dir: Path) -> None:
        self.path = Path(update_dir) / "daemon.lock"
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def daemon_running(update_dir: Path) -> bool:
    path = Path(update_dir) / "daemon.lock"
    if not path.exists():
        return False
    fd = os.open(str(path), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


