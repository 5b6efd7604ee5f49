"""The gate every desired-state message passes before the device follows it (issue 11).

``DesiredGate.check(topic, payload)`` runs on the MQTT thread for each message on the device's two
desired topics and says whether the follower may see it:

* with ``[update] require_signed_desired = true`` (the default) a message must carry a signature by
  one of ``[update] fleet_keys`` over this very topic (proto.desired), must not be expired (the
  device's clock, never believed below its time floor, with ``clock_slack_s``), and its
  ``sequence`` must be above the last one accepted on this topic, or be that very message again
  (retained messages come back on every reconnect). The last accepted sequence per topic is
  persisted in the update state file (atomic write) before the message is passed on, so a restart
  does not reopen the replay window. An empty ("clearing") message is unsigned, so it is refused too;
* with ``require_signed_desired = false`` unsigned messages pass (a quick try on a broker trusted
  entirely); signed ones are still checked when fleet keys are configured.

A refusal is counted by reason (``on_refused``: telemetry ``desired_refused`` and Prometheus) and
logged at WARNING once per reason (then at DEBUG: an open broker must not be able to flood the log).
The line says the message did not come from the hub's fleet key; it never blames the hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from edge.config import UpdateConfig
from edge.credentials import credential_path
from edge.logonce import OncePerKind
from proto import desired as signing
from proto.errors import ConfigError, DesiredRefused, KeyFileError
from proto.keys import MAX_KEY_FILE_BYTES, PublicKey, key_id, load_public_keys, parse_public_key

log = logging.getLogger("kestrel.updater")

STATE_KEY = "desired_seq"  # in update/state.json: topic -> [sequence, digest] of the last accepted message

Clock = Callable[[], Tuple[float, bool]]  # Updater.clock(): (now in seconds, whether the clock is believed)


def load_fleet_keys(update: UpdateConfig) -> Dict[str, PublicKey]:
    """Every key of ``[update] fleet_keys`` by key id; ConfigError naming the file that is wrong. A file
    may hold several keys, one ``.pub`` JSON line each (the hub's fleet.pub during a key rotation); a
    directory means every ``*.pub`` in it."""
    keys: Dict[str, PublicKey] = {}
    for entry in update.fleet_keys:
        path = Path(credential_path(entry))
        try:
            if path.is_file():
                if path.stat().st_size > MAX_KEY_FILE_BYTES:
                    raise KeyFileError(f"{path} is too large to be a public key file")
                lines = [ln for ln in path.read_bytes().splitlines() if ln.strip()]
                if not lines:
                    raise KeyFileError(f"{path} holds no key")
                for line in lines:
                    pub = parse_public_key(line, str(path))
                    keys[key_id(pub)] = pub
            else:
                keys.update(load_public_keys(path))
        except OSError as exc:
            raise ConfigError(f"[update] fleet_keys: cannot read {path}: {exc.strerror}") from exc
        except KeyFileError as exc:
            raise ConfigError(f"[update] fleet_keys: {exc}") from exc
    return keys


class DesiredGate:
    def __init__(self, update: UpdateConfig, state: Any, clock: Clock,
                 on_refused: Optional[Callable[[str], None]] = None) -> None:
        """``state``: the update StateFile (get/modify); ``clock``: Updater.clock."""
        self.require = update.require_signed_desired
        self.slack_ms = int(update.clock_slack_s * 1000)
        self.keys = load_fleet_keys(update)
        self._state = state
        self._clock = clock
        self._on_refused = on_refused
        self._once = OncePerKind(log)
        self.refused: Dict[str, int] = {}
        if self.require and not self.keys and update.enabled:
            log.warning("no [update] fleet_keys configured: every desired-state message will be refused "
                        "(copy the hub's fleet.pub to the device and name it in fleet_keys)")

    def check(self, topic: str, payload: bytes) -> Tuple[bool, Any]:
        """(True, DesiredState) to follow, (True, None) for a clear the device may apply (unsigned
        messages allowed), (False, None) when refused (counted and logged)."""
        from proto import kestrel_pb2

        if not payload:
            if not self.require:
                return True, None
            return self._refuse(topic, DesiredRefused(signing.UNSIGNED, "an empty (clearing) message is not "
                                                                        "signed"))
        try:
            msg = kestrel_pb2.DesiredState.FromString(payload)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError; anything else is bad input too
            return self._refuse(topic, DesiredRefused(signing.MALFORMED, "not a DesiredState message"))
        if not msg.signature and not self.require:
            return True, msg
        if not self.keys and not self.require:
            return True, msg  # signed, but nothing to check it with: as if unsigned (allowed here)
        try:
            signing.verify(topic, msg, self.keys, now_ms=int(self._clock()[0] * 1000), slack_ms=self.slack_ms)
            self._accept_sequence(topic, msg)
        except DesiredRefused as exc:
            return self._refuse(topic, exc)
        return True, msg

    def _accept_sequence(self, topic: str, msg: Any) -> None:
        seq, digest = int(msg.sequence), signing.digest(topic, msg)
        last = (self._state.get(STATE_KEY) or {}).get(topic)
        if last is not None:
            last_seq, last_digest = int(last[0]), str(last[1])
            if seq == last_seq and digest == last_digest:
                return  # the same message again (a retained message after a reconnect)
            if seq <= last_seq:
                raise DesiredRefused(signing.REPLAYED, f"sequence {seq} is not above {last_seq}, the last one "
                                                       "accepted on this topic")

        def remember(data: Dict[str, Any]) -> None:
            data.setdefault(STATE_KEY, {})[topic] = [seq, digest]

        self._state.modify(remember)

    def _refuse(self, topic: str, exc: DesiredRefused) -> Tuple[bool, Any]:
        self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        if self._on_refused is not None:
            self._on_refused(exc.reason)
        self._once.log(exc.reason, logging.WARNING,
                       "ignored a desired-state message on %s: %s. Only current messages signed by the "
                       "hub's fleet key are followed; this one is not one (forged, altered, replayed or "
                       "stale), whoever published it (%d refused for this reason)",
                       topic, exc, self.refused[exc.reason])
        return False, None
