"""What paho's two private hooks save (docs/adr/0011-paho-private-hooks.md): the ingest's MQTT link alone
drains FRAMES queued 50 KB QoS 1 frames from a private Mosquitto, acknowledging them in batches from
another thread as the commit thread does (a 5 ms pause per batch stands for the commit's fsync), once
with the hooks and once with paho's own reads and acks.

Figures: recv calls per packet and ack packets queued (counted, so stable from run to run), frames/s and
process CPU ms per frame (timed: noisy on a shared machine). Not part of ``tests.bench.run``.
Run alone: ``.venv/bin/python -m tests.bench.paho_hooks_cost`` (``KESTREL_BENCH_HOOKS_FRAMES``, 5000).
"""

from __future__ import annotations

import json
import os
import queue
import resource
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

from hub.broker import BrokerTarget
from hub.config import MqttSection
from hub.ingest import pahohooks
from hub.ingest.message import Message
from hub.ingest.mqttlink import MqttLink
from proto import topics
from tests.helpers.broker import Mosquitto
from tests.hub import frame_payload, jpeg, publish_all

FRAMES = int(os.environ.get("KESTREL_BENCH_HOOKS_FRAMES", "5000"))
ACK_BATCH_MAX = 200
COMMIT_S = 0.005


def drain(broker: Mosquitto, hooks: bool) -> Dict[str, Any]:
    cfg = MqttSection(share_group=f"g{uuid.uuid4().hex[:6]}")
    cid = f"hooks-cost-{uuid.uuid4().hex[:6]}"
    first = MqttLink(BrokerTarget(broker.host, broker.port), cfg, cid, deliver=lambda m: None)
    first.start()
    assert first.wait_subscribed(10)
    first.stop()  # the session stays: the frames below are queued for it
    images = [jpeg(i, w=280, h=210) for i in range(4)]
    publish_all(broker.host, broker.port, [(topics.frames("cam-1"), frame_payload(f"f{i}", "cam-1", seq=i,
                                                                                    image=images[i % 4]))
                                           for i in range(FRAMES)], timeout=300)
    got: queue.Queue[Message] = queue.Queue()
    saved = pahohooks.ReadAheadSocket.__init__.__defaults__, pahohooks.puback_queue
    if not hooks:  # paho's own reads (a 1-byte read-ahead passes every read through, counted) and acks
        pahohooks.ReadAheadSocket.__init__.__defaults__ = (1,)
        pahohooks.puback_queue = lambda client: None  # type: ignore[assignment]
    try:
        return _run(MqttLink(BrokerTarget(broker.host, broker.port), cfg, cid, deliver=got.put), got, hooks)
    finally:  # the socket is made when the link connects: restored only after the run
        pahohooks.ReadAheadSocket.__init__.__defaults__, pahohooks.puback_queue = saved


def _run(link: MqttLink, got: queue.Queue[Message], hooks: bool) -> Dict[str, Any]:
    done = threading.Event()

    def commit_thread() -> None:
        n = 0
        while n < FRAMES:
            batch: List[Message] = [got.get()]
            while len(batch) < ACK_BATCH_MAX:
                try:
                    batch.append(got.get_nowait())
                except queue.Empty:
                    break
            link.ack(batch)
            n += len(batch)
            time.sleep(COMMIT_S)
        done.set()

    threading.Thread(target=commit_thread, daemon=True).start()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    link.start()
    assert done.wait(300), "the frames did not all arrive"
    t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    sock = link.client.socket()
    out = {"hooks": hooks, "frames": FRAMES, "fps": round(FRAMES / (t1 - t0), 1),
           "cpu_ms_per_frame": round(((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1000 / FRAMES, 4),
           "recv_per_packet": round(sock.recv_calls / FRAMES, 2) if isinstance(sock, pahohooks.ReadAheadSocket)
           else None,
           "ack_packets_queued": link.ack_writes}
    link.stop()
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kestrel-hooks-cost-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto").start()
        try:
            for hooks in (True, False):
                print(json.dumps(drain(broker, hooks)))
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
