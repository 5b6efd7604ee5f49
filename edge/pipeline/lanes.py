"""Fair scheduling of several cameras onto one inference thread: a bounded queue per source (a *lane*,
with its own size and drop policy) and a round-robin :meth:`FairQueue.take`.

Each source's capture thread puts frames into its own lane. ``drop_oldest`` drops that lane's oldest
frame when it is full (a live camera: the model always sees recent frames of it); ``block`` makes that
capture thread wait for room (a file: nothing skipped). The inference thread takes frames one lane
after the other, starting after the lane it served last and skipping empty ones: every source with a
frame waiting is served once per round, so a fast camera (or a file read as fast as it decodes) gets
no more than its turn while a slow one has frames, and takes the idle turns of the others (nothing
waits while any frame is queued). One lock guards every lane; the inference thread waits on one
condition for any frame, each blocked capture thread on its lane's own.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Deque, List, Optional, Tuple


class Lane:
    """One source in the pipeline: its queue and its counters (written by its capture thread and by the
    inference thread, each its own)."""

    def __init__(self, name: str, source: Any, maxsize: int, drop_oldest: bool, lock: threading.Lock) -> None:
        self.name = name
        self.source = source
        self.maxsize = max(1, int(maxsize))
        self.drop_oldest = drop_oldest
        self.items: Deque[Any] = collections.deque()
        self.not_full = threading.Condition(lock)
        self.ended = False           # the capture thread finished (end of file, stop, failure)
        self.captured = 0
        self.dropped = 0
        self.processed = 0
        self.errors = 0
        self.capture_error: Optional[BaseException] = None
        self.capture_cpu_s = 0.0
        self.last_depth = -1

    @property
    def corrupt(self) -> int:
        return int(getattr(self.source, "corrupt", 0))

    def health(self) -> Tuple[bool, int]:
        """(up, reconnects): open and not ended; a live source's failed opens and lost streams."""
        is_open = getattr(self.source, "is_open", None)
        up = not self.ended and (bool(is_open) if is_open is not None else True)
        return up, int(getattr(self.source, "failures", 0))


class FairQueue:
    """Bounded per-source queues, taken round-robin (see the module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self.lanes: List[Lane] = []
        self._next = 0  # the lane the next round starts at
        self._open = 0  # lanes whose capture has not ended

    def add(self, name: str, source: Any, maxsize: int, drop_oldest: bool) -> Lane:
        lane = Lane(name, source, maxsize, drop_oldest, self._lock)
        with self._lock:
            self.lanes.append(lane)
            self._open += 1
        return lane

    def put(self, lane: Lane, item: Any) -> int:
        """Queue ``item`` on ``lane``; returns how many frames were dropped for it (0 or 1). With
        ``block`` this waits for room (the inference thread keeps taking until every lane has ended)."""
        dropped = 0
        with self._lock:
            q = lane.items
            if len(q) >= lane.maxsize:
                if lane.drop_oldest:
                    q.popleft()
                    dropped = 1
                else:
                    while len(q) >= lane.maxsize:
                        lane.not_full.wait()
            q.append(item)
            self._not_empty.notify()
        return dropped

    def end(self, lane: Lane) -> None:
        """``lane``'s capture is over: once every lane has ended and been drained, ``take`` returns []."""
        with self._lock:
            if not lane.ended:
                lane.ended = True
                self._open -= 1
            self._not_empty.notify()

    def take(self, n: int = 1) -> List[Tuple[Lane, Any]]:
        """Up to ``n`` queued frames, round-robin over the lanes (a lane gives a second frame only when the
        others have none); waits for one. [] when every lane has ended and nothing is queued."""
        with self._lock:
            while True:
                out = self._pick(n)
                if out or not self._open:
                    return out
                self._not_empty.wait()

    def _pick(self, n: int) -> List[Tuple[Lane, Any]]:
        lanes = self.lanes
        k = len(lanes)
        out: List[Tuple[Lane, Any]] = []
        i = self._next
        idle = 0  # lanes looked at in a row without a frame
        while len(out) < n and idle < k:
            lane = lanes[i % k]
            i += 1
            if lane.items:
                out.append((lane, lane.items.popleft()))
                lane.not_full.notify()
                idle = 0
            else:
                idle += 1
        self._next = i % k if k else 0
        return out

    def depth(self) -> int:
        """Frames queued over every lane."""
        with self._lock:
            return sum(len(lane.items) for lane in self.lanes)
