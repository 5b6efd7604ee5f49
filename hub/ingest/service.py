"""The ingest as ``kestrel-hub serve`` runs it: the MQTT link (hub/ingest/mqttlink.py) feeding the batch
pipeline (hub/ingest/pipeline.py), which hands committed messages back to the link to acknowledge."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import paho.mqtt.client as mqtt

from hub.broker import BrokerTarget
from hub.config import MqttSection
from hub.ingest.message import Message
from hub.ingest.mqttlink import MqttLink
from hub.ingest.pipeline import Pipeline
from hub.store.base import FrameRecord, Store


class Ingest:
    """Subscribe, validate, store, then acknowledge. ``start()`` returns at once (connects in background).

    ``dead_letter_dir``: where frames the store refuses (or whose id another device owns) are kept
    before they are acknowledged (HubConfig.dead_letter_dir). ``on_commit(seconds, stored frames)``: called
    after every committed batch (hub.metrics.HubMetrics.batch_committed).
    """

    def __init__(self, store: Store, target: BrokerTarget, cfg: MqttSection, client_id: str,
                 dead_letter_dir: Path, session_file: Optional[Path] = None,
                 on_commit: Optional[Callable[[float, Sequence[FrameRecord]], None]] = None) -> None:
        """``session_file``: where the link remembers that the broker holds this hub's session
        (<data_dir>/mqtt-session.json in ``serve``), so a session lost across a restart is noticed."""
        self.store = store
        self.cfg = cfg
        self.link = MqttLink(target, cfg, client_id, deliver=self._deliver, session_file=session_file)
        self.pipeline = Pipeline(store, cfg, dead_letter_dir, acknowledger=self.link, on_commit=on_commit,
                                 on_receipts=self.link.publish_receipts if cfg.receipts else None,
                                 hub_id=client_id)

    def _deliver(self, m: Message) -> None:
        self.pipeline.offer(m)

    @property
    def client(self) -> mqtt.Client:
        """The paho client of the ingest's connection (the hub publishes desired states through it)."""
        return self.link.client

    def start(self) -> Ingest:
        self.pipeline.start()
        self.link.start()
        return self

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self.link.wait_subscribed(timeout)

    def stop(self) -> None:
        self.pipeline.stop()
        self.link.stop()

    @property
    def threads_alive(self) -> bool:
        return self.pipeline.threads_alive

    def health(self) -> Dict[str, Any]:
        snap = self.pipeline.snapshot()
        snap["connected"] = self.link.connected
        snap.update(self.link.stats())
        snap["threads_alive"] = self.threads_alive
        return snap
