"""What the hub keeps in its data folder for itself: the one-hub lock and the ports it chose.

* :class:`DataDirLock`: ``<data_dir>/hub.lock``, an exclusive ``fcntl.flock`` taken before the hub starts
  or rewrites anything (the broker, broker.json, hub.json, the client id file). A second hub on the same
  folder gets :class:`~hub.errors.DataDirBusy` (a ConfigError: exit 2) naming the holder's PID, which the
  holder writes into the file once it has the lock; the second hub writes nothing. The lock goes with the
  process (the kernel drops it on exit, SIGKILL included), and the file descriptor is not inherited by
  the embedded Mosquitto (Python opens files close-on-exec), so a broker outliving its hub does not
  hold it.
* :class:`KeptPorts`: ``<data_dir>/ports.json``, the gRPC and HTTP ports the hub bound with ``port = 0``;
  the next start binds the same ones when they are free (devices and scripts keep finding the hub),
  like the embedded broker's port in broker/broker.json.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Dict, Optional

from hub.errors import ConfigError, DataDirBusy
from proto import atomic

log = logging.getLogger("hub.datadir")

LOCK_FILE = "hub.lock"
PORTS_FILE = "ports.json"


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> DataDirLock:
        """Take the lock or raise DataDirBusy naming the holder; writes our PID only once it is ours."""
        try:
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: the holder's PID is in it
        except OSError as exc:
            raise ConfigError(f"cannot open the hub's lock file {self.path}: {exc.strerror}; make [hub] "
                              "data_dir writable") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise DataDirBusy(f"another hub (pid {holder}) is running on the data folder {self.path.parent}: "
                              "stop it first, or give this one its own [hub] data_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (its PID is stale, not a lock)
            self._fd = None


def _free(bind: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
        try:
            s.bind((bind or "0.0.0.0", port))
        except OSError:
            return False
    return True


class KeptPorts:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / PORTS_FILE

    def _read(self) -> Dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
            return {str(k): int(v) for k, v in data.items() if 0 < int(v) < 65536}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def choose(self, name: str, configured: int, bind: str) -> int:
        """The port to bind for ``name``: the configured one, else (``port = 0``) the one chosen last time
        when it is free again, else 0 (any free port; logged when the old one is taken)."""
        if configured:
            return configured
        previous = self._read().get(name, 0)
        if previous and _free(bind, previous):
            return previous
        if previous:
            log.warning("the %s port %d of the previous run is taken; using a free one (clients configured "
                        "with %d must be told the new port, or set [%s] port)", name, previous, previous, name)
        return 0

    def keep(self, name: str, configured: int, bound: int) -> None:
        """Remember the port the hub chose for ``name`` (nothing to keep when it was configured)."""
        if configured:
            return
        ports = self._read()
        if ports.get(name) == bound:
            return
        ports[name] = bound
        try:
            atomic.write_text(self.path, json.dumps(ports, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("cannot keep the %s port in %s: %s", name, self.path, exc.strerror or exc)
