"""The locks and the request file between ``kestrel-edge install|rollback`` and a running daemon.

``UpdateLock`` (``{data_dir}/update/update.lock``) is the exclusive right to change slots, taken by
the CLI and by the daemon's update worker (``Updater.locked``). ``DaemonLock``
(``update/daemon.lock``) is held by a running daemon for its lifetime; ``daemon_running`` tests it,
so the CLI knows whether to change the slots itself or to ask the daemon. It asks through
``update/control.json``: ``request`` writes one request, the daemon's worker ``take_request``s it
(see docs/updates.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from edge.errors import UpdateBusy
from proto.clock import now_ms
from proto.errors import ArtifactError

LOCK_WAIT_S = 60.0  # the daemon waits this long for the CLI to finish with the update lock
CONTROL_FILE = "control.json"  # in the update dir: one request from the CLI to the running daemon



class UpdateLock:
    """``update.lock`` in ``update_dir``: the exclusive right to change slots (CLI and daemon worker)."""

    def __init__(self, update_dir: Path) -> None:
        self.dir = Path(update_dir)
        self._lock_owner: Optional[int] = None

    @contextlib.contextmanager
    def locked(self, wait_s: float = 0.0) -> Iterator[None]:
        """Exclusive right to change slots (CLI and daemon worker). ``wait_s`` = 0: UpdateBusy at once
        when held elsewhere; else wait up to that long for it. Re-entrant within one thread."""
        if self._lock_owner == threading.get_ident():
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.dir / "update.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if time.monotonic() >= deadline:
                        raise UpdateBusy("another update is being installed right now; try again when it "
                                         "ends") from exc
                    time.sleep(0.05)
            self._lock_owner = threading.get_ident()
            try:
                yield
            finally:
                self._lock_owner = None
        finally:
            os.close(fd)


# ---- control requests from the CLI to a running daemon ----
def request(update_dir: Path, action: str, **fields: Any) -> str:
    from proto import atomic

    rid = uuid.uuid4().hex
    atomic.write_json(Path(update_dir) / CONTROL_FILE, dict(fields, action=action, id=rid,
                                                           ms=now_ms()))
    return rid


def take_request(update_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(update_dir) / CONTROL_FILE
    try:
        with open(str(path), "rb") as fh:
            raw = fh.read(64 * 1024)
        req = json.loads(raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        req = None
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return req if isinstance(req, dict) else None


class DaemonLock:
    """Held by a running daemon for its lifetime; the CLI tests it to know whether to ask the daemon."""

    def __init__(self, update_dir: Path) -> None:
        self.path = Path(update_dir) / "daemon.lock"
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
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
    """True when a daemon holds ``daemon.lock``. ArtifactError when the lock file cannot be opened."""
    path = Path(update_dir) / "daemon.lock"
    try:
        fd = os.open(str(path), os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ArtifactError(f"cannot open {path}: {exc.strerror or exc} (run as the daemon's user)") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
