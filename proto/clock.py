"""The one wall clock of Kestrel's messages and records: milliseconds since the epoch."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock time in integer milliseconds (message and record timestamps; not for intervals:
    use time.monotonic() for those)."""
    return int(time.time() * 1000)
