"""Per-thread OS priority (Linux): threads whose work can wait yield the cores to the ones that cannot
(the frame sink's encoding, edge.uplink.sink; a video file's capture beside other cameras,
edge.pipeline.loop)."""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by ``increment`` (Linux only: there ``setpriority`` on a
    thread id affects that thread alone; elsewhere it would renice the whole process). True if done."""
    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (OSError, AttributeError) as exc:  # a sandbox that forbids it: run at normal priority
        log.debug("cannot lower the priority of thread %s: %s", threading.current_thread().name, exc)
        return False
    return True
