"""``kestrel-hub loadgen``: the short soak against a real hub (counts only: speed is the benchmark's,
tests/bench/bench_soak.py), the secure default with one enrolled identity per simulated device, the device side
of storage receipts against a hub played by a test client on a real broker, reconnects, the store count, errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, List

import paho.mqtt.client as mqtt
import pytest

from hub.loadgen import frames, storecheck
from hub.loadgen.device import Credentials, DeviceSettings
from hub.loadgen.runner import Plan, Run
from hub.store.base import FrameRecord
from hub.store.sqlite import SqliteStore
from proto import kestrel_pb2, topics
from tests.helpers.broker import Mosquitto, free_port
from tests.helpers.loadgen import Loadgen
from tests.helpers.wait import wait_for
from tests.hub import REPO, HubProcess, enrol, write_config


def test_short_soak_into_one_hub_stores_every_frame_once(tmp_path: Path) -> None:
    """20 devices x 10 fps for 8 s into a real hub (embedded plain broker, SQLite): every frame receipted,
    stored once, none rejected."""
    cfg = write_config(tmp_path / "hub.toml", tmp_path / "hub", security="tls = false")
    hub = HubProcess(cfg, tmp_path / "hub", tmp_path / "hub.log").start()
    try:
        wait_for(lambda: hub.health()["broker"]["connected"], 15, what="hub connected")
        lg = Loadgen(tmp_path, "--config", str(cfg), "--devices", "20", "--fps", "10", "--duration", "8",
                     "--frame-bytes", "20000", "--progress", "0")
        s = lg.wait()
        ingest = hub.health()["ingest"]
    finally:
        hub.stop()
    assert lg.rc == 0, s
    assert s["sent"] == s["done"] == s["store"]["stored"] == 1600 and s["devices"] == 20
    assert (s["not_receipted"], s["refused"], s["store"]["lost"], s["store"]["stored_twice"]) == (0, 0, 0, 0)
    assert ingest["stored"] == 1600 and ingest["duplicates"] == 0 and sum(ingest["rejected"].values()) == 0
    assert list(s["receipts_by_hub"].values()) == [1600]
    recs = lg.records()
    assert len(recs) == 1600 and {r["device"] for r in recs} == {f"loadgen-{i:04d}" for i in range(20)}
    assert all(r["committed_ms"] >= r["publish_s"] * 1000 - 5 for r in recs)  # committed after it was published


def test_secure_hub_with_one_enrolled_identity_per_device(tmp_path: Path) -> None:
    """The hub's default: TLS with client certificates and a per-device ACL; `devices add` identities."""
    cfg = write_config(tmp_path / "hub.toml", tmp_path / "hub")
    hub = HubProcess(cfg, tmp_path / "hub", tmp_path / "hub.log").start()
    ids = tmp_path / "ids"
    try:
        wait_for(lambda: hub.health()["broker"]["connected"], 15, what="hub connected")
        for name in ("cam-a", "cam-b", "cam-c"):
            enrol(cfg, name, ids)
        lg = Loadgen(tmp_path, "--identities", str(ids), "--config", str(cfg), "--devices", "3", "--fps", "5",
                     "--duration", "2", "--frame-bytes", "4000", "--progress", "0")
        s = lg.wait()
        more = subprocess.run([sys.executable, "-m", "hub", "loadgen", "--identities", str(ids), "--config", str(cfg),
                               "--devices", "4"], cwd=str(REPO), capture_output=True, text=True, timeout=60)
        no_cert = subprocess.run([sys.executable, "-m", "hub", "loadgen", "--config", str(cfg), "--devices", "1",
                                  "--duration", "1"], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    finally:
        hub.stop()
    assert lg.rc == 0, s
    assert s["store"]["stored"] == s["sent"] == 30 and s["store"]["lost"] == 0
    assert {r["device"] for r in lg.records()} == {"cam-a", "cam-b", "cam-c"}
    assert more.returncode == 2 and "3 identity bundles for --devices 4" in more.stderr
    assert len(more.stderr.strip().splitlines()) == 1
    # no client certificate: the broker's TLS listener closes the connection; one line, exit 2, not a long wait
    assert no_cert.returncode == 2 and "refused device loadgen-0000" in no_cert.stderr, no_cert.stderr
    assert len(no_cert.stderr.strip().splitlines()) == 1


class FakeHub:
    """A test client on a real broker playing the hub's receipts: ``decide(frame, copy)`` says what to answer to
    the copy-th arrival of a frame: "receipt", "refuse" or None (stay silent)."""

    def __init__(self, broker: Mosquitto, decide: Callable[[kestrel_pb2.Frame, int], Any]) -> None:
        self.decide = decide
        self.copies: dict = {}
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-hub", clean_session=True)
        self.c.on_connect = lambda c, *a: c.subscribe(topics.ALL_FRAMES, 1)
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.1, 0.1)  # type: ignore[arg-type]
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        f = kestrel_pb2.Frame()
        f.ParseFromString(msg.payload)
        with self.lock:
            n = self.copies[f.frame_id] = self.copies.get(f.frame_id, 0) + 1
        what = self.decide(f, n)
        if what is None:
            return
        r = kestrel_pb2.Receipt(device_id=f.device_id, committed_ms=f.capture_time_ms + 1, hub_id="fake")
        if what == "refuse":
            r.refused.add(frame_id=f.frame_id, reason="bad_image")
        else:
            r.frame_ids.append(f.frame_id)
        c.publish(topics.receipts(f.device_id), r.SerializeToString(), qos=1)

    def resend_request(self) -> None:
        self.c.publish(topics.HUB_RESEND, kestrel_pb2.ResendRequest(reason="test").SerializeToString(), qos=1)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def plan(broker: Mosquitto, devices: int = 2, fps: float = 20.0, duration: float = 0.5, timeout: float = 0.3,
         drain: float = 10.0, **kw: Any) -> Plan:
    s = DeviceSettings(host=broker.host, port=broker.port, run_id=f"t{free_port()}", receipt_timeout_s=timeout,
                       receipt_timeout_max_s=timeout * 4, reconnect_min_s=0.1, reconnect_max_s=0.5, **kw)
    return Plan(devices=[f"dev-{i}" for i in range(devices)], fps=fps, duration_s=duration, frame_bytes=2000,
                settings=s, credentials=[Credentials()], drain_s=drain)


@pytest.fixture
def own_broker(tmp_path: Path) -> Any:
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def test_a_frame_without_a_receipt_is_sent_again_until_one_names_it(own_broker: Mosquitto) -> None:
    hub = FakeHub(own_broker, lambda f, n: "receipt" if n >= 2 else None)  # the first copy is never receipted
    try:
        s = Run(plan(own_broker)).run()
    finally:
        hub.close()
    assert s["sent"] == 20 and s["done"] == 20 and s["not_receipted"] == 0
    assert s["resent"] == 20 and all(n == 2 for n in hub.copies.values())  # once each, after the timeout
    assert s["receipts_by_hub"] == {"fake": 20}


def test_a_resend_request_sends_every_unreceipted_frame_at_once(own_broker: Mosquitto) -> None:
    """With a receipt timeout far beyond the drain, only the hub's request can bring the frames back."""
    asked = threading.Event()
    hub = FakeHub(own_broker, lambda f, n: "receipt" if asked.is_set() else None)
    run = Run(plan(own_broker, timeout=600.0, drain=20.0))
    t = threading.Thread(target=lambda: setattr(run, "result", run.run()))
    t.start()
    try:
        wait_for(lambda: sum(hub.copies.values()) == 20, 15, what="every frame at the hub once")
        wait_for(lambda: run.waiting() == 20 and all(not d._by_mid for d in run.devices), 10,
                 what="every frame acknowledged by the broker")
        asked.set()
        hub.resend_request()
        t.join(30)
    finally:
        hub.close()
    s = run.result  # type: ignore[attr-defined]
    assert s["done"] == 20 and s["resent"] == 20 and s["resend_requests"] == 1 and s["not_receipted"] == 0


def test_frames_the_hub_refused_are_done_and_counted(own_broker: Mosquitto) -> None:
    hub = FakeHub(own_broker, lambda f, n: "refuse" if f.sequence % 2 else "receipt")
    try:
        s = Run(plan(own_broker, devices=1)).run()
    finally:
        hub.close()
    assert s["done"] == 10 and s["refused"] == 5 and s["resent"] == 0 and s["not_receipted"] == 0


def test_the_devices_reconnect_to_a_restarted_broker_and_lose_nothing(own_broker: Mosquitto) -> None:
    hub = FakeHub(own_broker, lambda f, n: "receipt")
    run = Run(plan(own_broker, devices=3, fps=10.0, duration=4.0, timeout=0.5, drain=20.0))
    t = threading.Thread(target=lambda: setattr(run, "result", run.run()))
    t.start()
    try:
        wait_for(lambda: len(run.records) >= 20, 15, what="frames receipted before the outage")
        own_broker.stop()
        wait_for(lambda: all(not d.connected.is_set() for d in run.devices), 10, what="the devices see the outage")
        own_broker.start()
        t.join(60)
    finally:
        hub.close()
    s = run.result  # type: ignore[attr-defined]
    assert s["reconnects"] >= 3 and s["sent"] == s["done"] == 120 and s["not_receipted"] == 0


def test_without_receipts_a_frame_is_done_on_its_puback(own_broker: Mosquitto) -> None:
    s = Run(plan(own_broker, receipts=False)).run()  # no hub at all: the broker's acknowledgement is the end
    assert s["done"] == s["sent"] == 20 and s["receipts_by_hub"] == {"-": 20} and s["resent"] == 0


def test_store_count_names_lost_frames_and_frames_stored_twice(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "hub.db")
    img = frames.jpeg_of_about(2000, 0)[0]

    def rec(fid: str, dev: str, seq: int) -> FrameRecord:
        return FrameRecord(frame_id=fid, device_id=dev, capture_time_ms=1_000_000 + seq, received_ms=0,
                           model_name="m", model_version=1, model_sha256="", reasons=[], top_k=[], image=img,
                           image_format="jpeg", width=1, height=1, sequence=seq)
    stored: List[FrameRecord] = [rec(frames.frame_id("r1", "d0", i), "d0", i) for i in (0, 1, 3)]
    stored += [rec("r1-d0-x", "d0", 1),  # sequence 1 under a second id: stored twice
               rec(frames.frame_id("r1", "d0", 9), "d0", 9),  # never published by the run
               rec(frames.frame_id("r0", "d0", 2), "d0", 2),  # another run's
               rec(frames.frame_id("r1", "d1", 0), "d1", 0)]
    store.add_frames(stored)
    got = storecheck.count(store, "r1", {"d0": 4, "d1": 2}, since_ms=0)
    store.close()
    assert (got["published"], got["stored"], got["lost"], got["stored_twice"], got["unexpected"]) == (6, 4, 2, 1, 1)
    assert got["lost_sample"] == ["r1-d0-2", "r1-d1-1"]


def test_an_unreachable_broker_is_one_line_and_exit_3(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "hub", "loadgen", "--host", "127.0.0.1", "--port", str(free_port()),
                        "--devices", "1", "--duration", "1"], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "cannot connect" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "hub", "loadgen", "--fps", "0"], cwd=str(REPO), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--fps" in r.stderr


def test_the_first_ctrl_c_stops_publishing_and_still_reports(own_broker: Mosquitto, tmp_path: Path) -> None:
    from tests.helpers.mqtt import Collector
    seen = Collector(own_broker.host, own_broker.port, [topics.ALL_FRAMES])
    lg = Loadgen(tmp_path, "--host", own_broker.host, "--port", str(own_broker.port), "--devices", "2", "--fps", "10",
                 "--duration", "600", "--frame-bytes", "2000", "--no-receipts", "--progress", "0")
    try:
        seen.wait_count(10)
        lg.proc.send_signal(signal.SIGINT)
        s = lg.wait(60)
    finally:
        lg.kill()
        seen.close()
    assert lg.rc == 0 and 10 <= s["sent"] < 600 * 20 and s["done"] == s["sent"] and s["not_receipted"] == 0
