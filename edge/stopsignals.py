"""SIGTERM and SIGINT for the edge daemon, handled without taking a lock inside the signal handler.

Python runs a signal handler in the main thread between two bytecodes, possibly while that thread holds
a lock: inside ``Event.wait`` the Event's own (non-reentrant) lock, inside a logging call its handler's
lock. A handler that calls ``Event.set()`` (or logs) can then wait forever for a lock its own thread
holds: the hub hung so right after SIGSTOP/SIGCONT (hub/server.py). So the handler here only writes the
signal's number into a pipe (``os.write`` takes no Python lock; the pipe's write end never blocks), and a
thread of its own reads the pipe and calls ``on_signal(name)`` there, where setting Events and logging
are safe. Standard library only.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Dict, Optional, Sequence

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CLOSE = b"\0"  # no signal has number 0: tells the reading thread to end
JOIN_TIMEOUT_S = 5.0


class StopSignals:
    """``install()`` (from the main thread) routes ``signals`` to ``on_signal(name)`` on the thread
    "stop-signals"; ``close()`` puts the previous handlers back and ends that thread."""

    def __init__(self, on_signal: Callable[[str], None], signals: Sequence[int] = STOP_SIGNALS) -> None:
        self.on_signal = on_signal
        self.signals = tuple(signals)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # a full pipe drops a signal rather than block the handler
        self._previous: Dict[int, Any] = {}
        self._thread = threading.Thread(target=self._run, name="stop-signals", daemon=True)

    def install(self) -> StopSignals:
        self._thread.start()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        del frame
        try:
            os.write(self._write_fd, bytes([signum]))
        except OSError:  # closed (after close()) or full: nothing to do in a handler
            pass

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:  # the write end is closed
                return
            for signum in data:
                if signum == 0:  # close()
                    return
                try:
                    self.on_signal(signal.Signals(signum).name)
                except Exception:  # the next signal must still be handled
                    log.exception("handling %s failed", signal.Signals(signum).name)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        try:
            os.write(self._write_fd, _CLOSE)
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT_S)
        for fd in (self._write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass
