"""Several ``kestrel-hub serve`` workers on one broker and one store (docs/hub.md, Scale-out): real Mosquitto, real
hub processes sharing one SQLite file and one security folder, the real load generator as a process.

A worker (``[mqtt] session_expiry_s = 0``) SIGKILLed mid-stream loses nothing and stores nothing twice: its
session ends with its connection, so the broker hands every new frame to the other worker, and its last will
(a ResendRequest) has the devices resend what the broker dropped with it. The devices' receipt timeout is
longer than the test, so only the will can bring those frames back in time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

import pytest

from hub import config as hubconfig
from proto import kestrel_pb2, topics
from proto.errors import ConfigError
from tests.helpers.broker import Mosquitto
from tests.helpers.loadgen import Loadgen
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for
from tests.hub import HubProcess, frame_payload, publish_all, write_config

WORKER_MQTT = 'share_group = "workers"\nsession_expiry_s = 0'


def start_workers(tmp_path: Path, broker: Mosquitto, names: str = "ab") -> Dict[str, HubProcess]:
    """Workers with their own data folders, sharing the store (one SQLite file), the broker and [security] dir."""
    db, sec = tmp_path / "shared.db", tmp_path / "security"
    hubs = {}
    for n in names:
        cfg = write_config(tmp_path / f"{n}.toml", tmp_path / n, broker.host, broker.port, client_id=f"worker-{n}",
                           store_url=f"sqlite:///{db}", extra_mqtt=WORKER_MQTT, security=f'dir = "{sec}"')
        hubs[n] = HubProcess(cfg, tmp_path / n, tmp_path / f"{n}.log").start()
    for h in hubs.values():
        wait_for(lambda h=h: h.health()["broker"]["connected"], 15, what="worker connected")  # type: ignore[misc]
    return hubs


def stored(h: HubProcess) -> int:
    return int(h.health()["ingest"]["stored"])  # type: ignore[index]


def test_session_expiry_setting() -> None:
    assert hubconfig.from_dict({}).mqtt.session_expiry_s == -1  # a single hub: the broker queues while it is away
    assert hubconfig.from_dict({"mqtt": {"session_expiry_s": 0}}).mqtt.session_expiry_s == 0
    with pytest.raises(ConfigError, match="session_expiry_s"):
        hubconfig.from_dict({"mqtt": {"session_expiry_s": -2}})


def test_a_worker_killed_mid_stream_loses_nothing_and_stores_nothing_twice(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    hubs = start_workers(tmp_path, broker)
    a, b = hubs["a"], hubs["b"]
    lg = Loadgen(tmp_path, "--host", broker.host, "--port", str(broker.port), "--devices", "10", "--fps", "10",
                 "--duration", "15", "--frame-bytes", "8000", "--receipt-timeout", "60", "--drain", "30",
                 "--store", f"sqlite:///{tmp_path / 'shared.db'}", "--progress", "0")
    try:
        wait_for(lambda: stored(a) >= 30, 30, what="worker a storing its share")
        t_kill = time.time()
        a.kill()
        base = stored(b)
        wait_for(lambda: stored(b) >= base + 400, 30, what="worker b storing the whole stream alone")
        t_restart = time.time()
        a.start()
        wait_for(lambda: stored(a) >= 20, 30, what="the restarted worker taking its share again")
        s = lg.wait()
    finally:
        lg.kill()
        for h in hubs.values():
            h.stop()
        broker.stop()
    assert lg.rc == 0, s
    st = s["store"]
    assert s["sent"] == st["published"] == st["stored"] == 10 * 10 * 15
    assert (st["lost"], st["stored_twice"], st["unexpected"], s["not_receipted"], s["refused"]) == (0, 0, 0, 0, 0)
    assert set(s["receipts_by_hub"]) == {"worker-a", "worker-b"}
    assert s["resend_requests"] >= 1  # worker a's will (and its restart's request): nothing waited for the timeout
    recs = lg.records()
    dead = [r for r in recs if t_kill <= r["publish_s"] < t_restart - 1.5]  # in flight at the restart: left out
    assert len(dead) >= 50
    # while a was dead its share did not wait for it: b committed every frame published meanwhile
    assert {r["hub_id"] for r in dead} == {"worker-b"}, sorted({r["hub_id"] for r in dead})


def test_a_worker_stopped_gracefully_hands_its_share_over_at_once(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    hubs = start_workers(tmp_path, broker)
    resends = Collector(broker.host, broker.port, [topics.HUB_RESEND])
    try:
        assert hubs["a"].stop() == 0
        (payload,) = resends.wait_count(1)  # the will, asked for on the way out
        req = kestrel_pb2.ResendRequest()
        req.ParseFromString(payload)
        assert req.hub_id == "worker-a" and "left the share group" in req.reason
        publish_all(broker.host, broker.port, [(topics.frames(f"cam-{i % 4}"), frame_payload(f"g{i}", f"cam-{i % 4}"))
                                               for i in range(100)])
        wait_for(lambda: stored(hubs["b"]) == 100, 20, what="worker b storing every frame")
    finally:
        resends.close()
        for h in hubs.values():
            h.stop()
        broker.stop()
