"""What the MQTT link hands the batch pipeline, and what the pipeline hands back to acknowledge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Protocol


@dataclass
class Message:
    """One received message. ``generation`` counts the link's connections: a message is acknowledged
    only on the connection that delivered it (the broker resends the others to the next one)."""
    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int
    received_ms: int


class Acknowledger(Protocol):
    def ack(self, msgs: List[Message]) -> int:
        """Acknowledge these messages (committed) in order; how many were acknowledged or skipped."""
