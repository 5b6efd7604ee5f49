"""Which devices the ingest takes messages from: known ones, new ones (auto-registered with the batch's
writes) unless ``allow_unknown_devices = false``, then a refused stranger is remembered a while so its
every message does not cost a store lookup. With ``require_enrolled = true`` only devices enrolled by
`kestrel-hub devices add` and not revoked (issue 11), looked up again after a few seconds so an
enrolment or a revocation takes effect without a restart. Used by the commit thread only (the stage
thread reads ``stage_ahead``)."""

from __future__ import annotations

import time
from typing import Dict, Set, Tuple

from hub.errors import PayloadRejected
from hub.store.base import Store

UNKNOWN_DEVICE_CACHE_S = 5.0  # a refused (or, require_enrolled, any) device is looked up again after this
UNKNOWN_DEVICES_MAX = 10000   # refused devices remembered at most (then forgotten all at once)


class DeviceGate:
    def __init__(self, store: Store, allow_unknown: bool, require_enrolled: bool = False) -> None:
        self.store = store
        self.allow_unknown = allow_unknown
        self.require_enrolled = require_enrolled
        self._known: Set[str] = set()
        self.registering: Set[str] = set()  # new devices of the batch being processed
        self._refused: Dict[str, float] = {}  # unknown devices refused -> monotonic time to look again
        self._enrolled: Dict[str, Tuple[bool, float]] = {}  # require_enrolled: device -> (ok, look again at)

    def begin(self) -> None:
        """A (new attempt at a) batch: nothing of it is registering yet."""
        self.registering = set()

    def is_known(self, device_id: str) -> bool:
        return device_id in self._known

    def stage_ahead(self, device_id: str) -> bool:
        """Whether the stage thread may write this device's images before the commit checks it: a
        device known already, or any when every device is accepted (no bytes written for strangers)."""
        return device_id in self._known or (self.allow_unknown and not self.require_enrolled)

    def check(self, device_id: str) -> None:
        """Refuse an unknown device (allow_unknown_devices = false) or note it in ``registering`` for
        auto-registration, which the pipeline does with the batch's other writes: a device whose first
        message is its status appears with that status at once, never as a blank record first. May
        raise StoreError (the lookup)."""
        if self.require_enrolled:
            self._check_enrolled(device_id)
        if device_id in self._known or device_id in self.registering:
            return
        refused_until = self._refused.get(device_id)
        if refused_until is not None and time.monotonic() < refused_until:
            raise PayloadRejected("unknown_device", f"device {device_id!r} is not registered "
                                                    "(allow_unknown_devices = false)")
        if self.store.get_device(device_id) is None:
            if not self.allow_unknown:
                # remembered a while: a stranger's every message must not cost a store lookup
                if len(self._refused) >= UNKNOWN_DEVICES_MAX:
                    self._refused.clear()
                self._refused[device_id] = time.monotonic() + UNKNOWN_DEVICE_CACHE_S
                raise PayloadRejected("unknown_device", f"device {device_id!r} is not registered "
                                                        "(allow_unknown_devices = false)")
            self.registering.add(device_id)
        else:
            self._known.add(device_id)

    def _check_enrolled(self, device_id: str) -> None:
        """require_enrolled: only devices enrolled and not revoked (the answer kept UNKNOWN_DEVICE_CACHE_S)."""
        now = time.monotonic()
        hit = self._enrolled.get(device_id)
        if hit is None or hit[1] <= now:
            dev = self.store.get_device(device_id)
            if len(self._enrolled) >= UNKNOWN_DEVICES_MAX:
                self._enrolled.clear()
            hit = (dev is not None and bool(dev.enrolled_ms) and not dev.revoked_ms, now + UNKNOWN_DEVICE_CACHE_S)
            self._enrolled[device_id] = hit
        if not hit[0]:
            raise PayloadRejected("unknown_device", f"device {device_id!r} is not enrolled or was revoked "
                                                    "(require_enrolled = true)")

    def registered(self) -> Set[str]:
        """The batch is committed: its new devices are known now (returned); the next batch starts afresh."""
        new, self.registering = self.registering, set()
        self._known |= new
        return new
