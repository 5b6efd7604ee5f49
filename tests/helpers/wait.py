"""Wait on a condition with a timeout instead of sleeping."""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: Optional[str] = None) -> T:
    """Poll ``cond`` until it returns something truthy; return it. AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last: T = cond()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)
        last = cond()
    return last
