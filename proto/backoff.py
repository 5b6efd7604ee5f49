"""Exponential reconnect backoff that resets only after the link stayed up for a while.

One rule for every retry loop of the codebase: the devices' MQTT connection (edge.uplink.mqtt) and
live camera sources (edge.sources), the hub's MQTT link (hub.ingest.mqttlink), its store retries
(hub.ingest.pipeline) and its embedded broker's restarts (hub.broker): every failed attempt waits
``initial`` doubling up to ``maximum``; a success resets the wait only after it lasted ``stable_s``,
so a peer that accepts and drops us at once (a broker refusing a packet, a camera pipeline failing
after a few frames) is not hammered at the initial rate.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Deque, Optional

HISTORY = 64  # waits kept for diagnostics and tests (a device runs for months)


class Backoff:
    """Not thread-safe: owned by the one thread that connects."""

    def __init__(self, initial: float, maximum: float, stable_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial = initial
        self.maximum = maximum
        self.stable_s = stable_s
        self._clock = clock
        self._next = initial
        self._up_since: Optional[float] = None
        self.history: Deque[float] = collections.deque(maxlen=HISTORY)  # the latest waits, oldest first

    def next(self) -> float:
        """An attempt failed (or the link went down): the wait before the next one (recorded)."""
        wait = self._next
        self.history.append(wait)
        self._next = min(wait * 2.0, self.maximum)
        self._up_since = None
        return wait

    def up(self) -> None:
        """The link is up (connected, opened) from now on."""
        self._up_since = self._clock()

    def stable(self) -> bool:
        """True once the link has been up for ``stable_s``; the backoff starts from ``initial`` again."""
        if self._up_since is None or self._clock() - self._up_since < self.stable_s:
            return False
        self._next = self.initial
        return True

    def reset(self) -> None:
        """Start from ``initial`` again (e.g. after a wait of another kind)."""
        self._next = self.initial
