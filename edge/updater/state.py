"""The update state machine and its persisted record ({data_dir}/update/state.json).

States: IDLE -> DOWNLOADING -> VERIFIED -> STAGED -> SELF_TEST -> TRIAL -> COMMITTED, or
ROLLING_BACK -> ROLLED_BACK / FAILED with a reason. Every transition is written atomically before
anything depends on it, under an inter-process lock (``state.json.lock``: the CLI and the daemon
both write the file). ``KESTREL_CRASH_AT=<STATE>`` (tests only) SIGKILLs the process right after
that state is persisted, to prove each step is crash safe.

Besides the state, the file keeps what the device must never forget (docs/updates.md):

* ``floors``: per model name, the highest version ever switched to (a high-water mark that a
  rollback never lowers): the verifier refuses anything at or below it;
* ``slots``: per slot, what became of the bundle in it (staged, selftest_failed, trial,
  committed, rejected); only a ``committed`` slot is ever rolled back to;
* ``time_floor_s``: the newest signed ``created`` time seen in an installed bundle: the device's
  clock is never believed below it;
* ``fleet_rollback_ms``: the ``issued_ms`` of the last fleet rollback handled (applied once);
* ``rejected``: name:version that failed its self-test or was too large; desired state does not
  retry them (a version that was switched to and rolled back is at or below the floor instead).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from proto import atomic
from proto.clock import now_ms

log = logging.getLogger("kestrel.updater")

IDLE = "IDLE"
DOWNLOADING = "DOWNLOADING"
VERIFIED = "VERIFIED"
STAGED = "STAGED"
SELF_TEST = "SELF_TEST"
TRIAL = "TRIAL"
COMMITTED = "COMMITTED"
ROLLING_BACK = "ROLLING_BACK"
ROLLED_BACK = "ROLLED_BACK"
FAILED = "FAILED"

STATES = (IDLE, DOWNLOADING, VERIFIED, STAGED, SELF_TEST, TRIAL, COMMITTED, ROLLING_BACK, ROLLED_BACK,
          FAILED)
IN_PROGRESS = (DOWNLOADING, VERIFIED, STAGED, SELF_TEST)
RESTING = (IDLE, COMMITTED, ROLLED_BACK, FAILED)

# What became of the bundle in a slot (state.json "slots"); only COMMITTED slots are rollback targets.
OUT_STAGED = "staged"
OUT_SELFTEST_FAILED = "selftest_failed"
OUT_TRIAL = "trial"
OUT_COMMITTED = "committed"
OUT_REJECTED = "rejected"

CRASH_ENV = "KESTREL_CRASH_AT"
HISTORY_MAX = 50


def crash_point(name: str) -> None:
    """Test hook: die like a power cut (SIGKILL, no cleanup) when KESTREL_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("KESTREL_CRASH_AT=%s: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)



def _default() -> Dict[str, Any]:
    return {
        "state": IDLE,
        "reason": "",
        "model_name": "",
        "target_version": 0,
        "updated_ms": 0,
        "trial": None,  # {slot, previous_slot, boot_count, started_ms, baseline, judge_threshold}
        "rolling_back": None,  # {from_slot, to_slot (None = the factory model), reason}
        "rejected": {},  # "name:version" -> reason (self-test failed, too large); not retried from desired state
        "floors": {},  # model name -> highest version ever switched to (never lowered)
        "slots": {},  # "a"/"b" -> {bundle_sha256, model_name, version, outcome}
        "time_floor_s": 0.0,
        "fleet_rollback_ms": 0,
        "history": [],
    }


class StateFile:
    """The persisted update record. Thread safe; every change is one atomic write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._data = self._read()

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Blocking flock across processes for one read-modify-write of the state file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read(self) -> Dict[str, Any]:
        data = _default()
        try:
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict) and loaded.get("state") in STATES:
                data.update(loaded)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("update state file %s unreadable (%s); starting from IDLE", self.path, exc)
        return data

    def reload(self) -> None:
        with self._lock:
            self._data = self._read()

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._data)

    @property
    def state(self) -> str:
        with self._lock:
            return str(self._data["state"])

    @property
    def trial(self) -> Optional[Dict[str, Any]]:
        with self._lock:
            t = self._data.get("trial")
            return copy.deepcopy(t) if t else None

    def is_rejected(self, name: str, version: int) -> Optional[str]:
        with self._lock:
            r = self._data.get("rejected", {}).get(f"{name}:{int(version)}")
            return str(r) if r else None

    def floor(self, name: str) -> int:
        """The highest version of ``name`` this device ever switched to (0 = none)."""
        with self._lock:
            return int((self._data.get("floors") or {}).get(name, 0))

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return copy.deepcopy(self._data.get(key, default))

    def transition(self, state: str, *, reason: str = "", crash: bool = True, reject: bool = False,
                   mutate: Optional[Callable[[Dict[str, Any]], None]] = None, **fields: Any) -> Dict[str, Any]:
        """Persist a new state (and extra fields); log it; return the new snapshot.

        ``reject`` remembers the target version as refused: desired-state messages do not retry it.
        ``mutate(data)`` changes the freshly read record in place (a slot outcome, a floor) in the
        same atomic write as the state: one write per transition, and never one without the other.
        """
        if state not in STATES:
            raise ValueError(f"unknown update state {state!r}")
        with self._lock, self._file_lock():
            self._data = self._read()  # the CLI may have written it from another process
            prev = self._data["state"]
            self._data.update(fields)
            if mutate is not None:
                mutate(self._data)
            self._data["state"] = state
            self._data["reason"] = reason
            self._data["updated_ms"] = now_ms()
            if reject and self._data.get("model_name") and self._data.get("target_version"):
                key = f"{self._data['model_name']}:{int(self._data['target_version'])}"
                self._data.setdefault("rejected", {})[key] = reason or state
            hist: List[Dict[str, Any]] = self._data.setdefault("history", [])
            hist.append({"from": prev, "to": state, "reason": reason,
                         "version": self._data.get("target_version", 0), "ms": self._data["updated_ms"]})
            del hist[:-HISTORY_MAX]
            atomic.write_json(self.path, self._data)
            snap = copy.deepcopy(self._data)
        log.info("update %s -> %s%s (target %s v%s)", prev, state, f": {reason}" if reason else "",
                 snap.get("model_name") or "-", snap.get("target_version") or "-")
        if crash:
            crash_point(state)
        return snap

    def update(self, **fields: Any) -> None:
        """Change fields without a state transition (e.g. the trial boot count)."""
        with self._lock, self._file_lock():
            self._data = self._read()
            self._data.update(fields)
            atomic.write_json(self.path, self._data)

    def modify(self, fn: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
        """Apply ``fn(data)`` (in place) to the freshly read record and write it: one atomic
        read-modify-write under the inter-process lock. Returns a snapshot."""
        with self._lock, self._file_lock():
            self._data = self._read()
            fn(self._data)
            atomic.write_json(self.path, self._data)
            return copy.deepcopy(self._data)
