"""The hub's Prometheus metrics (``GET /metrics``), through prometheus_client with a registry of its own.

Times are in seconds. Histograms are observed as things happen (the ingest calls
:meth:`HubMetrics.batch_committed` after every committed batch); everything else is read when
Prometheus scrapes: the health snapshot (counters and states of the ingest, store and broker) and
the fleet (devices online, devices per model version and update state, frames waiting for a label),
from the store. Names are listed in docs/hub.md.

"publish -> stored": a Frame carries its capture time, not the moment it was published; a device
publishes a sampled frame right after capturing it (unless it waited in the device's spool while the
broker was unreachable), so ``kestrel_hub_frame_capture_to_stored_seconds`` is that latency, end to
end, on the device's clock. ``kestrel_hub_frame_received_to_stored_seconds`` is the hub's own part
(MQTT delivery to committed), on its clock.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hub.errors import KestrelError
from hub.store.base import FrameRecord, Store

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
INGEST_COUNTERS = (("received", "MQTT messages taken from the broker."),
                   ("stored", "Frames newly stored."),
                   ("duplicates", "Frames already stored (redeliveries)."),
                   ("telemetry", "Telemetry messages applied."),
                   ("status", "Status messages applied."),
                   ("acked", "Messages acknowledged to the broker."),
                   ("store_retries", "Batch commits retried after a store failure."),
                   ("dead_lettered", "Payloads kept in the dead-letter folder instead of the store."),
                   ("dropped_qos0", "Telemetry (QoS 0) dropped because the in-memory queue was full."),
                   ("commits", "Batches committed to the store."),
                   ("receipts", "Storage receipts published to devices (one per device and batch)."),
                   ("frames_receipted", "Frames named durable in storage receipts."),
                   ("frames_refused_receipted", "Frames named refused for good in storage receipts."))


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_)
    g.add_metric([], float(value))
    return g


class _Snapshot(Collector):
    """Everything read at scrape time: the health snapshot and the fleet from the store."""

    def __init__(self, health: Callable[[], Dict[str, Any]], store: Callable[[], Optional[Store]]) -> None:
        self.health = health
        self.store = store

    def collect(self) -> Iterator[Metric]:
        h = self.health()
        ing = h.get("ingest", {})
        yield _gauge("kestrel_hub_up", "1 while the hub serves.", 1)
        yield _gauge("kestrel_hub_store_up", "1 when the store answered the last ping.",
                     1 if h.get("store", {}).get("ok") else 0)
        yield _gauge("kestrel_hub_broker_connected", "1 while the ingest is connected to the broker.",
                     1 if h.get("broker", {}).get("connected") else 0)
        yield _gauge("kestrel_hub_ingest_paused", "1 while the ingest waits for an unavailable store.",
                     1 if ing.get("paused") else 0)
        yield _gauge("kestrel_hub_ingest_threads_alive", "1 while the ingest's validate and commit threads run.",
                     1 if ing.get("threads_alive") else 0)
        for key, help_ in INGEST_COUNTERS:
            yield CounterMetricFamily(f"kestrel_hub_ingest_{key}", help_, value=float(ing.get(key, 0)))
        rejected = CounterMetricFamily("kestrel_hub_ingest_rejected", "Payloads rejected, per reason.",
                                       labels=["reason"])
        for reason, n in sorted((ing.get("rejected") or {}).items()):
            rejected.add_metric([reason], float(n))
        yield rejected
        refused = CounterMetricFamily("kestrel_hub_grpc_refused", "gRPC calls refused before they ran, per "
                                      "reason: unauthenticated (no or an unknown token), permission_denied (the "
                                      "token's role may not), unavailable (the store could not be asked).",
                                      labels=["reason"])
        for reason, n in sorted((h.get("grpc", {}).get("refused") or {}).items()):
            refused.add_metric([reason], float(n))
        yield refused
        broker = h.get("broker", {})
        yield CounterMetricFamily("kestrel_hub_mqtt_sessions_lost", "Connections on which the broker no longer had "
                                  "the hub's session (frames it held are gone; devices were asked to resend).",
                                  value=float(broker.get("sessions_lost", 0)))
        if "restarts" in broker:
            yield CounterMetricFamily("kestrel_hub_embedded_broker_restarts", "Embedded Mosquitto restarts.",
                                      value=float(broker["restarts"]))
        store = self.store()
        if store is not None and h.get("store", {}).get("ok"):
            yield from self._fleet(store)

    @staticmethod
    def _fleet(store: Store) -> Iterable[Metric]:
        try:
            devices = store.list_devices()
            waiting = store.count_unlabelled()
        except KestrelError as exc:  # the store went away since the ping: leave the fleet out this scrape
            log.warning("metrics: cannot read the fleet from the store: %s", exc)
            return []
        states: Dict[str, int] = {"online": 0, "offline": 0, "unknown": 0}
        versions: Dict[Tuple[str, str, str], int] = {}
        for d in devices:
            states[d.state if d.state in states else "unknown"] += 1
            key = (d.reported_model, str(d.reported_version) if d.reported_version else "",
                   d.update_state or "")
            versions[key] = versions.get(key, 0) + 1
        out: List[Metric] = [_gauge("kestrel_hub_devices_online", "Devices whose last status said online.",
                                    states["online"])]
        by_state = GaugeMetricFamily("kestrel_hub_devices", "Devices known to the hub, per state.",
                                     labels=["state"])
        for state, n in sorted(states.items()):
            by_state.add_metric([state], n)
        out.append(by_state)
        by_version = GaugeMetricFamily("kestrel_hub_devices_by_model",
                                       "Devices per reported model version and update state.",
                                       labels=["model", "version", "update_state"])
        for (model, version, update_state), n in sorted(versions.items()):
            by_version.add_metric([model, version, update_state], n)
        out.append(by_version)
        out.append(_gauge("kestrel_hub_frames_unlabelled", "Frames waiting for a label.", waiting))
        return out


class HubMetrics:
    """The registry behind /metrics; ``batch_committed`` is the ingest's hook."""

    def __init__(self, health: Callable[[], Dict[str, Any]], store: Callable[[], Optional[Store]],
                 clock: Callable[[], float] = time.time) -> None:
        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        self.registry = CollectorRegistry(auto_describe=False)
        self._clock = clock
        self.commit = Histogram("kestrel_hub_ingest_commit_seconds", "Time to commit one ingest batch to the "
                                "store (validated messages to durable), seconds.", buckets=COMMIT_BUCKETS,
                                registry=self.registry)
        self.received_to_stored = Histogram(
            "kestrel_hub_frame_received_to_stored_seconds", "A frame from its MQTT delivery to the hub to "
            "committed in the store, seconds (hub clock).", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.capture_to_stored = Histogram(
            "kestrel_hub_frame_capture_to_stored_seconds", "A frame from its capture on the device (published "
            "at once unless it waited in the device's spool) to committed in the store, seconds (device clock "
            "vs hub clock).", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_Snapshot(health, store))

    def batch_committed(self, seconds: float, stored: Sequence[FrameRecord]) -> None:
        """One committed ingest batch: how long its commit took and the frames it newly stored."""
        self.commit.observe(max(0.0, seconds))
        now_ms = self._clock() * 1000.0
        for f in stored:
            self.received_to_stored.observe(max(0.0, (now_ms - f.received_ms) / 1000.0))
            if f.capture_time_ms > 0:
                self.capture_to_stored.observe(max(0.0, (now_ms - f.capture_time_ms) / 1000.0))

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
