"""End-to-end delivery (issue 12): a frame leaves the device's spool only when the hub has stored it.

Real parts only: `python -m hub serve` with its embedded Mosquitto on its secure default (TLS, client
certificates, the generated per-device ACL: receipts, the hub's announcement and resend requests go
through it) and SQLite store, devices enrolled with `kestrel-hub devices add`, the real edge daemon
(`python -m edge run`, the brightness model on a test pattern: every frame is low confidence, so every
frame is sampled and gets the next spool sequence). "Every frame once" is checked on what the hub
stored: the spool sequences 0..sampled-1, each exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional

import paho.mqtt.client as paho
import pytest

from hub.broker import packet_limit
from hub.store.sqlite import SqliteStore
from proto import topics
from tests.helpers.edgeproc import Device, identity_mqtt
from tests.helpers.wait import wait_for
from tests.hub import HubProcess, enrol, frame_payload, publish_all, write_config

pytestmark = pytest.mark.timeout(240)


def stored_sequences(data: Path, device_id: str) -> list:
    store = SqliteStore(data / "hub.db")
    try:
        return sorted(f.sequence for f in store.list_frames(device_id=device_id, limit=100000))
    finally:
        store.close()


def broker_pid(data: Path) -> int:
    return int(json.loads((data / "broker" / "broker.json").read_text())["pid"])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def settle(dev: Device, data: Path) -> Dict[str, Any]:
    """Stop the device once the hub has caught up; every sampled frame must be stored exactly once."""
    wait_for(lambda: dev.metric("kestrel_edge_frames_awaiting_receipt") == 0 and
             dev.metric("kestrel_edge_spool_frames") <= 3, 60, interval=0.2,
             what="the device's spool drained by receipts")
    s = dev.stop()
    assert s["spool_frames"] == 0 and s["hub_receipts"] is True, s
    seqs = stored_sequences(data, dev.id)
    assert seqs == list(range(s["sampled"])), (  # nothing lost, nothing stored twice (count by frame)
        f"sampled {s['sampled']}, stored {len(seqs)}, missing {sorted(set(range(s['sampled'])) - set(seqs))[:20]}")
    return s


def test_a_power_cut_on_the_hubs_host_loses_no_acknowledged_frame(tmp_path: Path, models_dir: Path) -> None:
    """The hub freezes; the broker saves its store (SIGUSR1), then acknowledges more frames it holds only
    in memory; broker and hub are SIGKILLed together (the power cut) and restarted. The device kept
    every frame the broker acknowledged (no receipt yet) and resends them after its receipt timeout."""
    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data, extra_mqtt="embedded_autosave_s = 3600")
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    dev: Optional[Device] = None
    try:
        ids = enrol(cfg, "cam-cut", tmp_path / "ids")
        dev = Device(tmp_path, models_dir, "cam-cut", int(hub.info["mqtt_port"]),  # type: ignore[arg-type]
                     receipt_timeout_s=2.0, receipt_timeout_max_s=4.0, **identity_mqtt(ids))
        wait_for(lambda: len(stored_sequences(data, "cam-cut")) >= 10, 60, interval=0.2, what="10 frames stored")
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGSTOP)
        mosq, db = broker_pid(data), data / "broker" / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        os.kill(mosq, signal.SIGUSR1)  # Mosquitto writes its store now (and then not for an hour)
        wait_for(lambda: db.exists() and db.stat().st_mtime_ns != before, 10, what="the broker's store saved")
        acked = dev.metric("kestrel_edge_frames_acked_total")
        wait_for(lambda: dev.metric("kestrel_edge_frames_acked_total") >= acked + 10, 20, interval=0.1,
                 what="10 frames acknowledged by the broker and held only in its memory")
        window = dev.metric("kestrel_edge_frames_awaiting_receipt")
        assert window >= 10  # the device still holds every one of them: no receipt came
        os.kill(mosq, signal.SIGKILL)  # the power cut: broker and hub at once
        hub.kill()
        wait_for(lambda: gone(mosq), 10, what="the broker gone")
        hub.start()
        s = settle(dev, data)
        assert s["frames_resent"] >= 10 and s["receipts"] > 0, s  # the lost ones came back from the device
        h = hub.health()
        assert h["broker"]["sessions_lost"] == 0  # type: ignore[index]  # the broker kept the hub's session
    finally:
        if dev is not None:
            dev.close()
        hub.stop()


def test_a_takeover_of_the_hubs_client_id_loses_nothing(tmp_path: Path, models_dir: Path) -> None:
    """Another client (an enrolled device: the broker lets it in, and Mosquitto's ACL does not tie a client
    id to an identity) connects with the hub's client id and a clean session while the hub is frozen: the
    broker drops the hub's session with the frames queued in it. The hub notices (session present:
    False), warns, counts it and asks the devices to resend; with a receipt timeout of 10 minutes only
    that request can bring the frames back in time."""
    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data, extra_mqtt="receive_maximum = 5")  # the rest queues
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    dev: Optional[Device] = None
    try:
        ids = enrol(cfg, "cam-take", tmp_path / "ids")
        intruder_ids = enrol(cfg, "cam-intruder", tmp_path / "ids")
        dev = Device(tmp_path, models_dir, "cam-take", int(hub.info["mqtt_port"]),  # type: ignore[arg-type]
                     receipt_timeout_s=600.0, receipt_timeout_max_s=600.0, **identity_mqtt(ids))
        wait_for(lambda: len(stored_sequences(data, "cam-take")) >= 10, 60, interval=0.2, what="10 frames stored")
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGSTOP)
        acked = dev.metric("kestrel_edge_frames_acked_total")
        wait_for(lambda: dev.metric("kestrel_edge_frames_acked_total") >= acked + 15, 20, interval=0.1,
                 what="15 frames queued for the frozen hub")
        intruder = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=str(hub.info["client_id"]),
                               clean_session=True)
        intruder.tls_set(ca_certs=str(intruder_ids["ca.crt"]), certfile=str(intruder_ids["device.crt"]),
                         keyfile=str(intruder_ids["device.key"]))
        intruder.connect("127.0.0.1", int(hub.info["mqtt_port"]))  # type: ignore[arg-type]
        intruder.loop_start()
        wait_for(intruder.is_connected, 10, what="the intruder connected")
        intruder.disconnect()
        intruder.loop_stop()
        hub.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: hub.health()["broker"]["sessions_lost"] == 1, 20,  # type: ignore[index]
                 what="the hub noticed its lost session")
        s = settle(dev, data)
        assert s["frames_resent"] >= 10, s
        h = hub.health()
        assert h["ingest"]["resend_requests"] == 1, h  # type: ignore[index]
        with urllib.request.urlopen(f"http://127.0.0.1:{hub.info['http_port']}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "kestrel_hub_mqtt_sessions_lost_total 1" in text
        log = (tmp_path / "hub.log").read_text()
        assert "WARNING hub.ingest.mqttlink: connected to" in log and "no longer had this hub's session" in log
        assert "the hub asked for a resend" in dev.log.read_text()
    finally:
        if dev is not None:
            dev.close()
        hub.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def publish_100_mib(port: int, tls: Optional[Dict[str, str]] = None) -> bool:
    """Publish 100 MiB at QoS 1 on a frame topic (over TLS with ``tls``' ca_file, cert_file, key_file);
    True when the broker acknowledged it, False when it closed the connection instead."""
    closed: list = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
    if tls:
        c.tls_set(ca_certs=tls["ca_file"], certfile=tls["cert_file"], keyfile=tls["key_file"])
    c.on_disconnect = lambda *a: closed.append(a)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        info = c.publish("kestrel/v1/devices/cam-big/frames", b"\0" * (100 * 1024 * 1024), qos=1)
        wait_for(lambda: closed or info.is_published(), 60, what="the broker's answer to 100 MiB")
        return info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def test_a_100_mib_publish_is_refused_by_the_broker_and_never_reaches_the_hubs_memory(tmp_path: Path) -> None:
    """The hub's default broker (the TLS listener of an enrolled device) refuses 100 MiB on its header."""
    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data)
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    try:
        assert hub.proc is not None
        wait_for(lambda: hub.health()["ok"], 15, what="a healthy hub")
        conf = (data / "broker" / "mosquitto.conf").read_text()
        assert "require_certificate true" in conf  # the secure default, and its size limit
        assert f"max_packet_size {packet_limit(4 * 1024 * 1024)}" in conf  # from [mqtt] max_payload_bytes
        tls = {k: v for k, v in identity_mqtt(enrol(cfg, "cam-big", tmp_path / "ids")).items() if k != "tls"}
        before = rss_kib(hub.proc.pid)
        assert publish_100_mib(int(hub.info["mqtt_port"]), tls) is False  # type: ignore[arg-type]
        publish_all("127.0.0.1", int(hub.info["mqtt_port"]),  # type: ignore[arg-type]
                    [(topics.frames("cam-big"), frame_payload("after", "cam-big"))], **tls)
        wait_for(lambda: hub.health()["ingest"]["stored"] == 1, 15, what="the next frame stored")  # type: ignore[index]
        assert hub.health()["ingest"]["received"] == 1  # type: ignore[index]
        assert rss_kib(hub.proc.pid) - before < 20 * 1024
    finally:
        hub.stop()


def test_behind_a_broker_without_a_limit_the_hubs_client_is_never_sent_100_mib(broker_factory: Any,
                                                                               tmp_path: Path) -> None:
    """An external broker the operator did not limit takes the publish; the hub's MQTT 5 CONNECT said
    its Maximum Packet Size, so the broker drops the message for the hub instead of sending it."""
    b = broker_factory()
    data = tmp_path / "hub"
    hub = HubProcess(write_config(tmp_path / "hub.toml", data, b.host, b.port, client_id="hub-big"), data,
                     tmp_path / "hub.log").start()
    try:
        assert hub.proc is not None
        wait_for(lambda: hub.health()["ok"], 15, what="a healthy hub")
        before = rss_kib(hub.proc.pid)
        assert publish_100_mib(b.port) is True  # this broker took it
        publish_all(b.host, b.port, [(topics.frames("cam-big"), frame_payload("after", "cam-big"))])
        wait_for(lambda: hub.health()["ingest"]["stored"] == 1, 30, what="the next frame stored")  # type: ignore[index]
        assert hub.health()["ingest"]["received"] == 1  # type: ignore[index]  # the big one never came
        assert rss_kib(hub.proc.pid) - before < 20 * 1024
    finally:
        hub.stop()
