"""Following the hub's desired state: the model version the device should run, or a fleet rollback.

``DesiredFollower`` is owned by the daemon's UpdateService (edge.updater.service): it takes the
retained desired-state messages (device topic over group topic) from the MQTT thread, and on the
service's worker thread decides whether the announced version is taken (the updater's admission
rules), fetches it from the hub, hands it to the install path, or applies a fleet rollback; a
transient failure is retried with a doubling delay, and an order arriving during a trial waits for
the trial to end.

Every message first passes edge.updater.desiredgate.DesiredGate (signed by a fleet key, not
expired, not replayed; refused ones never reach the follower, so a forged device-level message
cannot hide the group one either). Even a validly signed message is trusted for its intent only:
the device fetches only from its configured hub addresses, installs only a bundle whose signed
manifest names exactly the announced model and version, above its version floor, and a fleet
rollback only moves it to its own committed previous slot, once per ``issued_ms``, when it runs
the version the message rolls back from.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from edge.config import UpdateConfig
from edge.updater import state as st
from edge.updater.control import LOCK_WAIT_S
from edge.updater.desiredgate import DesiredGate
from edge.updater.engine import NoRollbackTarget, NothingToDo, Updater
from proto.errors import BundleError, KestrelError

log = logging.getLogger("kestrel.updater")

RETRY_DESIRED_S = 60.0  # a desired version whose download failed for a transient reason is retried after this
RETRY_DESIRED_MAX_S = 3600.0  # ... doubling up to this


class DesiredFollower:
    """The desired-state half of UpdateService. ``queue_desired(msg)`` hands a message to the
    service's worker, which calls ``on_desired_state`` with it; ``switch(slot_name, verify=...)``
    and ``rollback(reason)`` are the service's hot swap and rollback; ``stop`` is set when the
    service stops (it aborts a download)."""

    def __init__(self, update: UpdateConfig, updater: Updater, *, queue_desired: Callable[[Any], None],
                 switch: Callable[..., None], rollback: Callable[[str], bool], stop: threading.Event,
                 on_refused: Optional[Callable[[str], None]] = None, mqtt_ca_file: str = "") -> None:
        """``on_refused(reason)`` counts a message the gate refused (telemetry, Prometheus);
        ``mqtt_ca_file``: the CA downloads verify the hub with when [update] ca_file is empty."""
        self.update_cfg = update
        self.ca_file = update.ca_file or mqtt_ca_file
        self.updater = updater
        self.gate = DesiredGate(update, updater.state, updater.clock, on_refused)
        self._queue_desired = queue_desired
        self._switch = switch
        self._rollback = rollback
        self._stop = stop
        self._desired: Dict[str, Any] = {}  # "device" / "group" -> DesiredState (or None when cleared)
        self._handled_desired: Optional[Tuple[str, int, bool, int, int]] = None
        self._pending_desired: Any = None  # arrived during a trial: handled when it ends
        self._retry: Optional[Tuple[float, Any]] = None  # (monotonic time, desired) after a transient failure
        self._retry_delay = RETRY_DESIRED_S

    # ---- MQTT I/O thread: keep short ----
    def on_desired(self, topic: str, payload: bytes) -> None:
        kind = "group" if "/groups/" in topic else "device"
        accepted, msg = self.gate.check(topic, payload)
        if not accepted:
            return
        if msg is None:  # a clear (only when unsigned messages are allowed)
            self._desired[kind] = None
            return
        self._desired[kind] = msg
        chosen = self._desired.get("device") or self._desired.get("group")
        if chosen is not None:
            self._queue_desired(chosen)

    # ---- the service's worker thread ----
    def retry_if_due(self) -> None:
        """Run the desired state whose fetch (or fleet rollback) failed once its retry is due."""
        if self._retry is not None and time.monotonic() >= self._retry[0]:
            desired = self._retry[1]
            self._retry = None
            self.on_desired_state(desired)

    def after_trial(self) -> None:
        """A trial ended: the desired state that arrived during it is handled now."""
        if self._pending_desired is not None:
            desired, self._pending_desired = self._pending_desired, None
            self._queue_desired(desired)

    def on_desired_state(self, desired: Any) -> None:
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
        u = self.update_cfg
        asked = str(desired.grpc_target or "")
        if asked and (asked == u.hub_grpc or asked in u.grpc_targets):
            return asked
        if asked:
            log.warning("ignoring grpc_target %r from a desired-state message: it is neither [update] hub_grpc "
                        "nor listed in [update] grpc_targets", asked)
        return str(u.hub_grpc or "")

    def _fetch_and_install(self, desired: Any) -> None:
        from edge.updater.fetch import credentials, fetch_bundle
        from proto.bundle import read_bounded

        name, version = desired.model_name, int(desired.version)
        u = self.update_cfg
        target = self._grpc_target(desired)
        with self.updater.locked(wait_s=LOCK_WAIT_S):
            self.updater._transition(st.DOWNLOADING, reason=f"from {target or '(no hub address)'}",
                                     model_name=name, target_version=version)
            try:
                creds = credentials(u.tls, self.ca_file, u.token_file)  # read now: a rotated token counts
                part = fetch_bundle(target, name, version, downloads=self.updater.downloads,
                                    sha256=desired.sha256, size=int(desired.size),
                                    max_bundle_bytes=u.max_bundle_bytes, stop=self._stop, creds=creds)
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
            self.after_trial()
        self.updater.state.update(fleet_rollback_ms=issued)
