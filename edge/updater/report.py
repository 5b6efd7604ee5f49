"""What the updater reports, read-only: the VersionManifest of status messages and ``kestrel-edge status``.

Functions of an ``edge.updater.engine.Updater`` that only read its state file and slots (no lock,
no writes): ``manifest`` (the proto VersionManifest the daemon puts in every Status message),
``status`` (the dict behind ``kestrel-edge status [--json]``), ``previous_slot`` (where a rollback
would go, for display) and ``slot_ref`` (a slot as a proto ModelRef).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

from edge.updater.control import daemon_running
from edge.updater.engine import NoRollbackTarget
from edge.updater.slots import Slot

if TYPE_CHECKING:
    from edge.updater.engine import Updater


def previous_slot(upd: Updater) -> Optional[Slot]:
    """The committed slot a rollback would go to, or None (no re-verification: for display)."""
    if upd.slots.active() is None:
        return None
    try:
        return upd.rollback_target(verify=False)
    except NoRollbackTarget:
        return None


def manifest(upd: Updater) -> Any:
    from proto import kestrel_pb2

    upd.state.reload()
    snap = upd.state.snapshot()
    vm = kestrel_pb2.VersionManifest(update_state=snap["state"], reason=snap.get("reason", ""),
                                     target_version=int(snap.get("target_version") or 0),
                                     updated_ms=int(snap.get("updated_ms") or 0))
    active = upd.slots.active()
    if active is not None:
        vm.installed.CopyFrom(slot_ref(active))
        vm.version_floor = upd.state.floor(active.model_name)
        prev = previous_slot(upd)
        if prev is not None:
            vm.previous.CopyFrom(slot_ref(prev))
    return vm


def status(upd: Updater) -> Dict[str, Any]:
    snap = upd.state.snapshot()
    out: Dict[str, Any] = {"state": snap["state"], "reason": snap.get("reason", ""),
                           "target": {"model_name": snap.get("model_name", ""),
                                      "version": snap.get("target_version", 0)},
                           "trial": snap.get("trial"), "active_slot": upd.slots.active_name(),
                           "daemon_running": daemon_running(upd.dir),
                           "floors": snap.get("floors", {}),
                           "history": snap.get("history", [])[-10:]}
    for label, slot in (("installed", upd.slots.active()), ("previous", previous_slot(upd))):
        out[label] = None if slot is None else {
            "slot": slot.name, "model_name": slot.model_name, "version": slot.version,
            "model_sha256": slot.model_sha256, "installed_ms": slot.record.get("installed_ms", 0),
            "outcome": upd.outcome(slot)}
    return out


def slot_ref(slot: Slot) -> Any:
    from proto import kestrel_pb2

    return kestrel_pb2.ModelRef(name=slot.model_name, version=slot.version, sha256=slot.model_sha256)
