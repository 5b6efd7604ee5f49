"""The batch pipeline's counters (``/healthz`` ``ingest``, ``/metrics`` kestrel_hub_ingest_*)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from hub.ingest.parse import REASONS


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    telemetry: int = 0
    status: int = 0
    acked: int = 0
    store_retries: int = 0
    dead_lettered: int = 0
    dropped_qos0: int = 0
    commits: int = 0
    commit_ms_last: float = 0.0
    commit_ms_max: float = 0.0
    commit_ms_total: float = 0.0
    paused: bool = False
    last_store_error: str = ""
    rejected: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})

    def snapshot(self) -> Dict[str, Any]:
        return {"received": self.received, "stored": self.stored, "duplicates": self.duplicates,
                "telemetry": self.telemetry, "status": self.status, "acked": self.acked,
                "store_retries": self.store_retries, "dead_lettered": self.dead_lettered,
                "dropped_qos0": self.dropped_qos0, "commits": self.commits,
                "commit_ms_last": round(self.commit_ms_last, 2), "commit_ms_max": round(self.commit_ms_max, 2),
                "commit_ms_total": round(self.commit_ms_total, 1), "paused": self.paused,
                "last_store_error": self.last_store_error, "rejected": dict(self.rejected)}
