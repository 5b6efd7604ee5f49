"""systemd's notify protocol for ``kestrel-edge run`` (``Type=notify``, ``WatchdogSec=``), via ``sdnotify``.

* ``READY=1`` once the daemon runs: its pipeline started, or it waits on purpose for the hub to
  deploy a first model;
* ``STATUS=...`` lines saying what it does (shown by ``systemctl status``);
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` (what systemd passes for ``WatchdogSec=``), but only
  while the pipeline really makes progress: frames captured or inferred since the previous ping, or
  the daemon is deliberately idle (starting, no model yet, waiting for the hub). A camera that stops
  delivering or an inference thread that hangs stops the pings, and systemd restarts the daemon
  after ``WatchdogSec`` (``Restart=always``);
* ``STOPPING=1`` when it shuts down (then no more pings: ``TimeoutStopSec`` bounds the drain).

Without ``$NOTIFY_SOCKET`` (not started by systemd) everything here does nothing. The interval is
the environment's (tests shrink it by setting ``WATCHDOG_USEC``); ``PING_FRACTION`` is the share of it
between pings, as sd_watchdog_enabled(3) advises.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Hashable, Mapping, Optional

log = logging.getLogger(__name__)

PING_FRACTION = 0.5
IDLE = None  # what a progress callback returns while the daemon is deliberately idle (ping regardless)


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> Optional[float]:
    """systemd's watchdog interval for this process (WATCHDOG_USEC, when WATCHDOG_PID is unset or ours)."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 1e6


class ServiceNotifier:
    """READY / STATUS / WATCHDOG / STOPPING to systemd; a no-op outside a ``Type=notify`` unit."""

    def __init__(self, env: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_s = watchdog_interval_s(env, os.getpid()) if self.enabled else None
        self._notifier: Any = None
        if self.enabled:
            try:
                import sdnotify
            except ImportError:  # pragma: no cover - the edge extra installs it
                log.warning("NOTIFY_SOCKET is set but the sdnotify package is missing: systemd will not hear "
                            "from the daemon (pip install sdnotify)")
                self.enabled = False
            else:
                self._notifier = sdnotify.SystemdNotifier()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.pings = 0
        self.withheld = 0
        self._ready = False

    def _send(self, text: str) -> None:
        if self.enabled:
            self._notifier.notify(text)

    def ready(self, status: str) -> None:
        """READY=1 the first time, a STATUS line after that."""
        if self._ready:
            self.status(status)
            return
        self._ready = True
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self._stop.set()  # no more pings: TimeoutStopSec bounds the shutdown
        self._send(f"STOPPING=1\nSTATUS={status}")

    def start_watchdog(self, progress: Callable[[], Optional[Hashable]]) -> None:
        """Ping every PING_FRACTION x WatchdogSec while ``progress()`` changes between pings or is IDLE."""
        if not self.enabled or self.watchdog_s is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(progress,), name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self, progress: Callable[[], Optional[Hashable]]) -> None:
        assert self.watchdog_s is not None
        period = self.watchdog_s * PING_FRACTION
        last: Optional[Hashable] = object()  # nothing seen yet: the first pipeline reading counts as progress
        stalled_logged = False
        while not self._stop.wait(period):
            try:
                now = progress()
            except Exception:  # the watchdog must not die of a listener's bug; no ping then
                log.exception("watchdog: progress check failed")
                continue
            if now is IDLE or now != last:
                if stalled_logged:
                    log.info("watchdog: the pipeline makes progress again")
                    stalled_logged = False
                last = now
                self._send("WATCHDOG=1")
                self.pings += 1
            else:
                self.withheld += 1
                if not stalled_logged:
                    log.warning("watchdog: no frame captured or inferred for %.1fs: not telling systemd we are "
                                "alive (it restarts the daemon after WatchdogSec=%.0fs)", period, self.watchdog_s)
                    stalled_logged = True
