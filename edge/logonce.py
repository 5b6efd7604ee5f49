"""Log the first event of each kind, count the rest: a bad stream or a long outage cannot flood the log.

:class:`OncePerKind` is the one implementation of that rule in the daemon (frame errors on the
inference and sink threads, source failures, MQTT outages, spool write failures)::

    once = OncePerKind(log)
    once.log("decode", logging.WARNING, "frame %d: %s", seq, why)   # logged at WARNING
    once.log("decode", logging.WARNING, "frame %d: %s", seq, why)   # counted, logged at DEBUG
    once.counts()   # {"decode": 2}
    once.reset()    # the episode is over: the next of each kind is logged again (counts are kept)
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Optional, Set


class OncePerKind:
    """Thread-safe: ``log`` may be called from any thread."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {}
        self._logged: Set[str] = set()  # kinds logged since the last reset

    def log(self, kind: str, level: int, msg: str, *args: object,
            exc_info: Optional[BaseException] = None) -> bool:
        """Count one event of ``kind``; log ``msg % args`` at ``level`` (with ``exc_info``'s traceback)
        when it is the first of its kind since the last reset, else at DEBUG. True when logged at ``level``."""
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            self._log.log(level, msg, *args, exc_info=exc_info)
        else:
            self._log.debug(msg, *args)
        return first

    def counts(self) -> Dict[str, int]:
        """Events by kind, ever (a copy)."""
        with self._lock:
            return dict(self._counts)

    def logged(self) -> bool:
        """True when something was logged since the last reset (an episode is going on)."""
        with self._lock:
            return bool(self._logged)

    def reset(self) -> None:
        """The episode is over: the next event of each kind is logged again."""
        with self._lock:
            self._logged.clear()
