"""The fleet: devices with desired vs reported state; deploy and roll back via retained MQTT messages.

The hub never pushes a model to a device. It publishes a retained ``DesiredState`` (QoS 1) on
``kestrel/v1/devices/{id}/desired`` or ``kestrel/v1/groups/{group}/desired``; devices subscribe,
fetch the named version over gRPC (FetchModel), verify it themselves and report back through their
status messages (which the ingest writes into the device records). A rollback is a retained
DesiredState with ``rollback=true``: the device returns to its own previous slot; the hub never
sends an older bundle over the network. See docs/hub-registry.md.

The hub mirrors what the devices do with their two desired topics: a group deploy/rollback is kept
as the group's desired state (Store.set_group_desired), a device-specific one pins the device
(``desired_scope = "device"``). Listing a device that is not pinned shows its group's desired
state, so a device that joins after the deploy shows it too.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Protocol, Tuple

# the fleet's errors are defined in hub.errors, importable from here too
from hub.errors import FleetRequestError as FleetRequestError
from hub.errors import NotFound
from hub.errors import NothingToRollBack as NothingToRollBack
from hub.registry import Registry
from hub.store.base import DESIRED_SCOPE_DEVICE, DESIRED_SCOPE_GROUP, DeviceRecord, GroupDesired, Store
from proto import kestrel_pb2, topics
from proto.clock import now_ms

log = logging.getLogger(__name__)

PublishRetained = Callable[[str, bytes], None]


class Signer(Protocol):
    def sign(self, topic: str, msg: kestrel_pb2.DesiredState) -> kestrel_pb2.DesiredState: ...

    def published(self, topic: str, msg: kestrel_pb2.DesiredState) -> None: ...


@dataclasses.dataclass
class Announcement:
    desired: kestrel_pb2.DesiredState
    topic: str


def _target(device_id: str, group: str) -> Tuple[str, str]:
    """The topic for exactly one of device_id / group."""
    if bool(device_id) == bool(group):
        raise FleetRequestError("name exactly one of device_id or group")
    try:
        if device_id:
            return topics.device_desired(device_id), "device"
        return topics.group_desired(group), "group"
    except ValueError as exc:
        raise FleetRequestError(str(exc)) from exc


class FleetService:
    """List devices, deploy versions and roll back. ``publish_retained(topic, payload)`` must publish
    with QoS 1 and retain=True and return only once the broker acknowledged (raise otherwise)."""

    def __init__(self, store: Store, registry: Registry, publish_retained: PublishRetained,
                 grpc_target: str = "", signer: Optional[Signer] = None) -> None:
        """``signer``: the fleet key (hub.security.fleetkey.FleetSigner): every announcement is signed
        (``sign(topic, desired)``) and, once the broker took it, recorded (``published``); None only in
        tests of the unsigned past."""
        self.store = store
        self.registry = registry
        self.publish_retained = publish_retained
        self.grpc_target = grpc_target
        self._signer = signer

    def list_devices(self, group: Optional[str] = None) -> List[DeviceRecord]:
        """Device records with the desired state that applies to each (device-specific wins over the group's)."""
        return devices_with_desired(self.store, group)

    def deploy(self, model_name: str, version: int = 0, device_id: str = "", group: str = "") -> Announcement:
        """Announce that the device/group should run ``model_name`` ``version`` (0 = the highest stored)."""
        topic, _ = _target(device_id, group)
        if not model_name:
            raise FleetRequestError("model_name is required")
        rec = self.registry.get(model_name, version)  # NotFound for unknown versions
        desired = kestrel_pb2.DesiredState(model_name=rec.model_name, version=rec.version,
                                           sha256=rec.bundle_sha256, size=rec.size, issued_ms=now_ms(),
                                           rollback=False, grpc_target=self.grpc_target)
        self._announce(device_id, group, topic, desired)
        log.info("deploy %s v%d -> %s", rec.model_name, rec.version, topic)
        return Announcement(desired, topic)

    def rollback(self, device_id: str = "", group: str = "") -> Announcement:
        """Announce a rollback: devices return to their own previous slot.

        For one device the message names the previous version the hub last saw (informational; 0 when
        unknown); for a group, version is 0. ``rollback_from_version`` names the version rolled back
        from (the device's reported version; for a group, the version last deployed to it): a device
        acts only when it runs exactly that version, and at most once per ``issued_ms`` (persisted).
        NothingToRollBack when the hub cannot name that version (no model reported, no deploy to the
        group, or its last announcement was already a rollback): nothing is announced then.
        """
        topic, _ = _target(device_id, group)
        if device_id:
            dev = self.store.get_device(device_id)
            if dev is None:
                raise NotFound(f"device {device_id!r} is not known to the hub (it has not reported yet)")
            if dev.reported_version <= 0:
                raise NothingToRollBack(f"nothing to roll back from: device {device_id!r} reports no installed "
                                        "model")
            model_name, version, from_version = dev.reported_model, dev.previous_version, dev.reported_version
        else:
            gd = self.store.get_group_desired(group)
            if gd is not None and gd.rollback:
                raise NothingToRollBack(f"nothing to roll back from: the last announcement to group {group!r} "
                                        "was a rollback already (deploy a version, or roll back single devices)")
            if gd is None or gd.version <= 0:
                raise NothingToRollBack(f"nothing to roll back from: no version was deployed to group {group!r}")
            model_name, version, from_version = gd.model_name, 0, gd.version
        desired = kestrel_pb2.DesiredState(model_name=model_name, version=version, issued_ms=now_ms(),
                                           rollback=True, grpc_target=self.grpc_target,
                                           rollback_from_version=from_version)
        self._announce(device_id, group, topic, desired)
        log.info("rollback from v%d -> %s", from_version, topic)
        return Announcement(desired, topic)

    def _announce(self, device_id: str, group: str, topic: str, desired: kestrel_pb2.DesiredState) -> None:
        """Record, then publish (deploy and rollback alike): if the store fails nothing was announced
        (a retry is clean); if the publish fails, the previous record is put back, so the store never
        shows an announcement the broker did not take, and the caller's error says so."""
        restore = self._saved_record(device_id, group)
        if self._signer is not None:
            self._signer.sign(topic, desired)
        self._record(device_id, group, desired)
        try:
            self.publish_retained(topic, desired.SerializeToString())
            if self._signer is not None:
                self._signer.published(topic, desired)
        except BaseException:
            try:
                restore()
            except Exception:  # noqa: BLE001 - the publish error is the one to report
                log.exception("could not restore the desired state recorded for %s", topic)
            raise

    def _saved_record(self, device_id: str, group: str) -> Callable[[], None]:
        """A function that writes back what _record is about to overwrite."""
        def desired_of(dev: Optional[DeviceRecord]) -> Dict[str, object]:
            dev = dev or DeviceRecord("")
            return {"desired_model": dev.desired_model, "desired_version": dev.desired_version,
                    "desired_scope": dev.desired_scope}

        gd: Optional[GroupDesired] = None
        if device_id:
            devices = [(device_id, desired_of(self.store.get_device(device_id)))]
        else:  # a group that was never named gets an empty, non-rollback record back
            gd = self.store.get_group_desired(group) or GroupDesired(group, "", 0, False, 0)
            devices = [(d.device_id, desired_of(d)) for d in self.store.list_devices(group)]

        def restore() -> None:
            if gd is not None:
                self.store.set_group_desired(group, gd.model_name, gd.version, gd.rollback, gd.issued_ms)
            for device, saved in devices:
                self.store.upsert_device(device, **saved)

        return restore

    def _record(self, device_id: str, group: str, desired: kestrel_pb2.DesiredState) -> None:
        """The announcement in the store: a device-specific one pins the device; a group's is kept as
        the group's desired state and copied onto every known, unpinned device of the group (for a
        rollback: each device's own previous version as the hub last saw it)."""
        if device_id:
            self.store.upsert_device(device_id, desired_model=desired.model_name,
                                     desired_version=desired.version, desired_scope=DESIRED_SCOPE_DEVICE)
            return
        self.store.set_group_desired(group, desired.model_name, desired.version, desired.rollback,
                                     desired.issued_ms)
        for dev in self.store.list_devices(group):
            if dev.desired_scope == DESIRED_SCOPE_DEVICE:
                continue  # pinned: its own desired topic wins on the device
            if desired.rollback:
                model_name, version = dev.reported_model, dev.previous_version
            else:
                model_name, version = desired.model_name, desired.version
            self.store.upsert_device(dev.device_id, desired_model=model_name, desired_version=version,
                                     desired_scope=DESIRED_SCOPE_GROUP)


def devices_with_desired(store: Store, group: Optional[str] = None) -> List[DeviceRecord]:
    """The store's device records (of ``group``, or all) with the desired state that applies to each
    (FleetService.list_devices; the dashboard reads the same)."""
    groups: Dict[str, Optional[GroupDesired]] = {}
    out = []
    for dev in store.list_devices(group or None):
        if dev.group not in groups:
            groups[dev.group] = store.get_group_desired(dev.group)
        out.append(effective_desired(dev, groups[dev.group]))
    return out


def effective_desired(dev: DeviceRecord, group: Optional[GroupDesired]) -> DeviceRecord:
    """The desired model/version that applies to ``dev``: its own when pinned by a device-specific
    deploy/rollback, else its group's current desired state.

    After a group rollback a device known at the time keeps the previous version recorded for it then;
    one that joined later shows no desired version (it returns to its own previous slot, which the hub
    did not know when it announced the rollback).
    """
    if dev.desired_scope == DESIRED_SCOPE_DEVICE:
        # pinned: its own desired topic wins on the device and hides whatever the group was told
        return dataclasses.replace(dev, overrides_group=group is not None)
    if group is None:
        return dataclasses.replace(dev, overrides_group=False)  # no group announcement (older records)
    if group.rollback:
        if dev.desired_scope == DESIRED_SCOPE_GROUP:
            return dataclasses.replace(dev, overrides_group=False)
        return dataclasses.replace(dev, desired_model="", desired_version=0, desired_scope=DESIRED_SCOPE_GROUP,
                                   overrides_group=False)
    return dataclasses.replace(dev, desired_model=group.model_name, desired_version=group.version,
                               desired_scope=DESIRED_SCOPE_GROUP, overrides_group=False)


def device_message(dev: DeviceRecord) -> kestrel_pb2.Device:
    """A store record as the gRPC Device: desired and reported side by side."""
    return kestrel_pb2.Device(
        device_id=dev.device_id, group=dev.group, state=dev.state, last_seen_ms=dev.last_seen_ms,
        reported=kestrel_pb2.ModelRef(name=dev.reported_model, version=dev.reported_version,
                                      sha256=dev.reported_sha256),
        versions=kestrel_pb2.VersionManifest(
            installed=kestrel_pb2.ModelRef(name=dev.reported_model, version=dev.reported_version,
                                           sha256=dev.reported_sha256),
            previous=kestrel_pb2.ModelRef(name=dev.reported_model, version=dev.previous_version),
            update_state=dev.update_state, reason=dev.update_reason),
        desired_version=dev.desired_version, desired_model=dev.desired_model, threshold=dev.threshold,
        desired_scope=dev.desired_scope, overrides_group=dev.overrides_group, enrolled_group=dev.enrolled_group,
        enrolled_ms=dev.enrolled_ms, revoked_ms=dev.revoked_ms)
