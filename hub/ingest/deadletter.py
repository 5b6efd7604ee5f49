"""The ingest's dead-letter folder: ``DeadLetters(dir).keep(...)`` writes the raw payload of a message the
hub is about to acknowledge without storing it (a frame the store refuses, a frame_id another device
owns, a validation error) as ``<ms>-<device>-<mid>-<n>.frame`` with a ``.json`` beside it saying why."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Protocol

from hub.errors import StoreUnavailable
from proto import atomic

log = logging.getLogger("hub.ingest.pipeline")  # the ingest's log, as before the split

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Received(Protocol):
    """What is kept of a received message (hub.ingest.message.Message)."""
    mid: int
    topic: str
    payload: bytes
    received_ms: int


class DeadLetters:
    """The dead-letter folder of one ingest; ``count`` is the number of dead letters it wrote."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.count = 0  # dead letters written by this ingest (part of their names)

    def keep(self, m: Received, reason: str, detail: str, index: int, ms: int) -> None:
        """Keep a payload we are about to acknowledge without storing:
        <dir>/<ms>-<device>-<mid>-<n>.frame + .json, ``ms`` the time now, n counting every dead letter of
        this process (QoS 0 messages all have mid 0: two of one millisecond must not overwrite each other).
        Raises StoreUnavailable when it cannot (then nothing is acknowledged and the batch is retried)."""
        self.count += 1
        device = _UNSAFE.sub('_', m.topic.split('/')[-2] if '/' in m.topic else 'x')
        stem = f"{ms}-{device}-{m.mid}-{self.count}"
        meta = {"topic": m.topic, "reason": reason, "detail": detail, "received_ms": m.received_ms,
                "bytes": len(m.payload), "batch_index": index}
        try:
            atomic.write_bytes(self.dir / f"{stem}.frame", m.payload)
            atomic.write_bytes(self.dir / f"{stem}.json",
                               (json.dumps(meta, sort_keys=True) + "\n").encode())
        except OSError as exc:
            raise StoreUnavailable(f"cannot write to the dead-letter folder {self.dir}: "
                                   f"{exc.strerror}") from exc
        log.warning("kept %s payload from %s in %s/%s.frame: %s", reason, m.topic, self.dir,
                    stem, detail)
