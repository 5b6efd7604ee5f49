"""Fleet security (issue 11, part A) against a real Mosquitto running the configuration the hub
generates: the CA and its files, the identity bundle, certificate and password authentication, the
per-device ACL, revocation, and the real `kestrel-hub serve` with enrolled devices."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import ssl
import stat
import subprocess
import sys
import tarfile
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hub import config as hubconfig
from hub.broker import EmbeddedBroker, packet_limit
from hub.errors import SecurityError
from hub.security import enrol
from hub.security.ca import revoked_serials
from hub.security.identity import read_bundle
from hub.store.open import open_store
from hub.store.sqlite import SqliteStore
from proto import kestrel_pb2, topics
from tests.helpers.tlscerts import make_tls
from tests.helpers.wait import wait_for
from tests.hub import REPO, HubProcess, frame_payload, publish_all, write_config
from tests.hub import enrol as enrol_cli

CONNECT_WAIT_S = 10.0


def hub_cfg(tmp_path: Path, **security: Any) -> hubconfig.HubConfig:
    return hubconfig.from_dict({"hub": {"data_dir": str(tmp_path / "hub")}, "security": security})


# ---- an MQTT client that says whether the broker let it in ----

class Client:
    def __init__(self, port: int, *, ca: str = "", cert: str = "", key: str = "", username: str = "",
                 password: Optional[str] = None, tls: bool = True) -> None:
        self.port = port
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:10]}")
        if tls:
            self.c.tls_set(ca_certs=ca or None, certfile=cert or None, keyfile=key or None,
                           cert_reqs=ssl.CERT_REQUIRED)
        if username:
            self.c.username_pw_set(username, password)
        self.connected, self.done = threading.Event(), threading.Event()
        self.messages: List[Tuple[str, bytes]] = []
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a, **k: self.done.set()
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        (self.done if reason.is_failure else self.connected).set()

    def connect(self) -> bool:
        """True when the broker answered CONNACK success; False when it refused (or dropped) us."""
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=10)
        except (ssl.SSLError, OSError):
            return False
        self.c.loop_start()
        wait_for(lambda: self.connected.is_set() or self.done.is_set(), CONNECT_WAIT_S, what="CONNACK or refusal")
        if not self.connected.is_set():
            self.close()
        return self.connected.is_set()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def subscribe(self, *topics_: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a, **k: done.set()
        self.c.subscribe([(t, 1) for t in topics_])
        assert done.wait(10), "no SUBACK"

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def device_tls(files: Dict[str, Path]) -> Dict[str, str]:
    return {"ca": str(files["ca.crt"]), "cert": str(files["device.crt"]), "key": str(files["device.key"])}


def extract(bundle: Path, out: Path) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, data in read_bundle(bundle).items():
        files[name] = out / name
        files[name].write_bytes(data)
        files[name].chmod(0o600)
    return files


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Dict[str, Any]]:
    """A hub config, its Security and store, and its embedded Mosquitto running the generated config."""
    made: List[EmbeddedBroker] = []
    stores: List[Any] = []

    def make(**security: Any) -> Dict[str, Any]:
        cfg = hub_cfg(tmp_path / f"f{len(made)}", **security)
        sec = enrol.Security(cfg)
        store = open_store(cfg)
        stores.append(store)
        sec.write_broker_files(store)
        broker = EmbeddedBroker(cfg.data_dir / "broker",
                                listener=lambda port: sec.conf_lines(port, "127.0.0.1")).start()
        made.append(broker)
        hub = sec.hub_identity()
        return {"cfg": cfg, "sec": sec, "store": store, "broker": broker, "port": broker.port,
                "hub": {"ca": hub.ca_file, "cert": hub.cert_file, "key": hub.key_file},
                "hub_login": (hub.username, hub.password)}

    yield make  # type: ignore[misc]
    for b in made:
        b.stop()
    for s in stores:
        s.close()


def add(f: Dict[str, Any], name: str, group: str, tmp_path: Path, **kw: Any) -> Dict[str, Path]:
    e = enrol.add_device(f["cfg"], f["sec"], f["store"], name, group, tmp_path / "bundles", **kw)
    assert e.reloaded  # the running embedded broker was sent SIGHUP
    return extract(e.bundle, tmp_path / "ids" / name)


# ---- the CA, the keys, the bundle ----

def test_security_material_is_private_and_the_bundle_matches_the_contract(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    cfg = hub_cfg(tmp_path, mqtt_auth="both")
    sec = enrol.Security(cfg)
    store = open_store(cfg)
    try:
        with caplog.at_level(logging.DEBUG):
            sec.write_broker_files(store)
            e = enrol.add_device(cfg, sec, store, "cam-7", "lobby", tmp_path / "out", mqtt=("hub.example", 8883),
                                 hub_grpc="hub.example:50051")
        rec = store.get_device("cam-7")
        token_rec = store.get_token("device.cam-7")
    finally:
        store.close()
    assert stat.S_IMODE(os.stat(sec.dir).st_mode) == 0o700
    for name in ("ca.key", "fleet.key", "hub.key", "broker.key", "hub-mqtt-password", "passwd", "acl"):
        assert stat.S_IMODE(os.stat(sec.dir / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(e.bundle).st_mode) == 0o600
    raw = e.bundle.read_bytes()
    assert raw[257:263] == b"ustar\x00"  # a plain POSIX ustar archive
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        infos = {m.name: m for m in tar.getmembers()}
        assert all(m.isreg() and "/" not in m.name for m in infos.values())
        assert {n: stat.S_IMODE(m.mode) for n, m in infos.items()} == {
            "identity.json": 0o644, "edge.toml": 0o644, "ca.crt": 0o644, "device.crt": 0o644, "device.key": 0o600,
            "mqtt-password": 0o600, "grpc-token": 0o600, "fleet.pub": 0o644}
    files = read_bundle(e.bundle)
    ident = json.loads(files["identity.json"])
    assert ident == {"schema": 1, "device_id": "cam-7", "group": "lobby", "mqtt_host": "hub.example",
                     "mqtt_port": 8883, "hub_grpc": "hub.example:50051", "created_ms": rec.enrolled_ms}
    cert = x509.load_pem_x509_certificate(files["device.crt"])
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(files["ca.crt"]))
    assert cert.subject.rfc4514_string() == "CN=cam-7"
    key = serialization.load_pem_private_key(files["device.key"], None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert files["fleet.pub"].decode() == sec.fleet_pub
    # the snippet is a valid edge.toml (with the device's data_dir) pointing at the credentials directory
    import tomllib

    from edge import config as edgeconfig

    snippet = tomllib.loads(files["edge.toml"].decode())
    snippet["device"]["data_dir"] = str(tmp_path / "edge")
    ecfg = edgeconfig.from_dict(snippet)
    assert (ecfg.device.id, ecfg.device.group, ecfg.mqtt.tls, ecfg.mqtt.port) == ("cam-7", "lobby", True, 8883)
    assert ecfg.mqtt.key_file == "/etc/kestrel/credentials/device.key" and ecfg.mqtt.username == "cam-7"
    assert ecfg.update.fleet_keys == ["/etc/kestrel/credentials/fleet.pub"] and ecfg.update.require_signed_desired
    # its gRPC token (role device: fetch only) over TLS verified with the fleet CA; the store keeps its hash only
    assert ecfg.update.tls and ecfg.update.ca_file == "/etc/kestrel/credentials/ca.crt"
    assert ecfg.update.token_file == "/etc/kestrel/credentials/grpc-token"
    token = files["grpc-token"].decode().strip()
    assert token_rec is not None and token_rec.role == "device" and token_rec.active
    assert token_rec.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert (rec.enrolled_group, rec.revoked_ms, rec.group) == ("lobby", 0, "lobby")
    # no secret in the log: the device's key, its password, the hub's password
    logged = caplog.text
    password = files["mqtt-password"].decode().strip()
    assert password not in logged and "PRIVATE KEY" not in logged and token not in logged
    assert (sec.dir / "hub-mqtt-password").read_text().strip() not in logged
    assert password not in (sec.dir / "passwd").read_text()  # hashed


def test_names_that_could_break_the_acl_or_impersonate_the_hub_are_refused(tmp_path: Path) -> None:
    cfg = hub_cfg(tmp_path)
    sec = enrol.Security(cfg)
    store = open_store(cfg)
    try:
        for name in ("cam 1", "cam\nuser kestrel-hub", "-x", "a/b", "cam+", "", "kestrel-hub"):
            with pytest.raises(SecurityError):
                enrol.add_device(cfg, sec, store, name, "g", tmp_path, mqtt=("h", 1))
        with pytest.raises(SecurityError, match="invalid group"):
            enrol.add_device(cfg, sec, store, "cam-1", "g#", tmp_path, mqtt=("h", 1))
        assert store.list_devices() == []
        enrol.add_device(cfg, sec, store, "cam-1", "g", tmp_path, mqtt=("h", 1))
        with pytest.raises(SecurityError, match="enrolled already"):
            enrol.add_device(cfg, sec, store, "cam-1", "g", tmp_path, mqtt=("h", 1))
    finally:
        store.close()


# ---- the real broker with the generated configuration ----

def test_certificates_acl_and_revocation_on_the_real_broker(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    f = fleet()
    a, b = add(f, "cam-a", "g1", tmp_path), add(f, "cam-b", "g2", tmp_path)
    port = f["port"]
    hub = Client(port, **f["hub"])
    assert hub.connect()
    hub.publish(topics.group_desired("g1"), b"order-g1", retain=True)
    hub.publish(topics.group_desired("g2"), b"order-g2", retain=True)
    hub.subscribe(f"{topics.PREFIX}/#")
    dev_a = Client(port, **device_tls(a))
    assert dev_a.connect()
    # A reads its own group's order, never B's group's
    dev_a.subscribe(topics.group_desired("g2"), topics.group_desired("g1"), topics.device_desired("cam-b"))
    wait_for(lambda: any(t == topics.group_desired("g1") for t, _ in dev_a.messages), 10, what="g1's order")
    # A publishes on B's frames and status topics, then on its own: only its own reach the hub's identity
    dev_a.publish(topics.frames("cam-b"), b"forged-frame")
    dev_a.publish(topics.status("cam-b"), b"forged-status", retain=True)
    dev_a.publish(topics.group_desired("g1"), b"forged-order", retain=True)
    dev_a.publish(topics.frames("cam-a"), b"own-frame")
    wait_for(lambda: (topics.frames("cam-a"), b"own-frame") in hub.messages, 10, what="A's own frame")
    seen = [p for _, p in hub.messages]
    assert b"forged-frame" not in seen and b"forged-status" not in seen and b"forged-order" not in seen
    assert [t for t, _ in dev_a.messages] == [topics.group_desired("g1")]
    # no client certificate, another CA's certificate, no TLS at all: refused
    other = make_tls(tmp_path / "other-ca")
    assert not Client(port, ca=str(a["ca.crt"])).connect()
    assert not Client(port, ca=str(a["ca.crt"]), cert=str(other.cert), key=str(other.key)).connect()
    assert not Client(port, tls=False).connect()
    # revoked: the CRL lists it, it cannot connect again, and the connection it still holds may do nothing
    serial = int(x509.load_pem_x509_certificate(a["device.crt"].read_bytes()).serial_number)
    rec, n, reloaded = enrol.revoke_device(f["cfg"], f["sec"], f["store"], "cam-a")
    assert n == 1 and reloaded and rec.revoked_ms > 0
    assert serial in revoked_serials(f["sec"].path("crl.pem"))
    assert "cam-a" not in f["sec"].path("acl").read_text()
    from hub import auth  # its gRPC token is revoked with it: it may fetch no more
    assert auth.authenticate(f["store"], a["grpc-token"].read_text().strip()) is None
    assert auth.authenticate(f["store"], b["grpc-token"].read_text().strip()) is not None
    wait_for(lambda: not Client(port, **device_tls(a)).connect(), 15, what="the revoked certificate refused")
    dev_a.publish(topics.frames("cam-a"), b"after-revoke")
    dev_b = Client(port, **device_tls(b))
    assert dev_b.connect()  # the others are unaffected
    dev_b.publish(topics.frames("cam-b"), b"b-frame")
    wait_for(lambda: (topics.frames("cam-b"), b"b-frame") in hub.messages, 10, what="B's frame")
    assert b"after-revoke" not in [p for _, p in hub.messages]
    for c in (hub, dev_a, dev_b):
        c.close()


def test_receipts_and_the_hub_topics_under_the_acl(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 12's topics (docs/adr/0019-storage-receipts.md) on the real broker with the generated ACL: the
    hub's identity publishes storage receipts, the retained announcement and resend requests; a device reads
    its own receipts and both hub topics, never another device's receipts, and can publish on none of them."""
    f = fleet()
    a, b = add(f, "cam-a", "g1", tmp_path), add(f, "cam-b", "g1", tmp_path)
    port = f["port"]
    hub = Client(port, **f["hub"])
    assert hub.connect()
    hub.publish(topics.HUB_ANNOUNCE, b"announce", retain=True)
    dev_a, dev_b = Client(port, **device_tls(a)), Client(port, **device_tls(b))
    assert dev_a.connect() and dev_b.connect()
    for dev in (dev_a, dev_b):
        dev.subscribe(topics.receipts("cam-a"), topics.receipts("cam-b"), topics.HUB_ANNOUNCE, topics.HUB_RESEND)
        wait_for(lambda d=dev: (topics.HUB_ANNOUNCE, b"announce") in d.messages, 10, what="the retained announcement")
    hub.publish(topics.receipts("cam-b"), b"receipt-b")
    hub.publish(topics.receipts("cam-a"), b"receipt-a")
    hub.publish(topics.HUB_RESEND, b"resend")  # the broker sends one client's messages in order: the last
    for dev in (dev_a, dev_b):
        wait_for(lambda d=dev: (topics.HUB_RESEND, b"resend") in d.messages, 10, what="the resend request")
    assert sorted(dev_a.messages) == sorted([(topics.HUB_ANNOUNCE, b"announce"),  # B's receipt never reached A
                                             (topics.receipts("cam-a"), b"receipt-a"), (topics.HUB_RESEND, b"resend")])
    assert (topics.receipts("cam-b"), b"receipt-b") in dev_b.messages
    assert (topics.receipts("cam-a"), b"receipt-a") not in dev_b.messages
    # A forges a receipt for B, a resend request and withdraws the announcement: none of it goes through
    dev_a.publish(topics.receipts("cam-b"), b"forged-receipt")
    dev_a.publish(topics.HUB_RESEND, b"forged-resend")
    dev_a.publish(topics.HUB_ANNOUNCE, b"", retain=True)
    hub.publish(topics.receipts("cam-b"), b"receipt-b2")  # after A's publishes were acknowledged (and routed)
    wait_for(lambda: (topics.receipts("cam-b"), b"receipt-b2") in dev_b.messages, 10, what="the hub's next receipt")
    assert not [p for _, p in dev_b.messages if p.startswith(b"forged")]
    assert [p for t, p in dev_b.messages if t == topics.HUB_ANNOUNCE] == [b"announce"]
    late = Client(port, **device_tls(b))
    assert late.connect()
    late.subscribe(topics.HUB_ANNOUNCE)
    wait_for(lambda: late.messages, 10, what="the retained announcement, still there")
    assert late.messages == [(topics.HUB_ANNOUNCE, b"announce")]
    for c in (hub, dev_a, dev_b, late):
        c.close()


def test_password_authentication_and_the_loopback_plain_listener(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    from tests.helpers.broker import free_port

    plain = free_port()
    f = fleet(mqtt_auth="password", plain_port=plain)
    p = add(f, "cam-p", "g1", tmp_path)
    secret = p["mqtt-password"].read_text().strip()
    port = f["port"]
    tls = {"ca": str(p["ca.crt"])}
    assert Client(port, **tls, username="cam-p", password=secret).connect()
    assert not Client(port, **tls, username="cam-p", password=secret + "x").connect()  # wrong password
    assert not Client(port, **tls).connect()  # anonymous
    assert not Client(port, tls=False, username="cam-p", password=secret).connect()  # TLS required here
    # the plain listener: loopback only, password logins only
    conf = (f["cfg"].data_dir / "broker" / "mosquitto.conf").read_text()
    assert f"listener {plain} 127.0.0.1" in conf
    assert "\nset_tcp_nodelay true\n" in conf  # the embedded broker running on it: receipts leave at once
    assert Client(plain, tls=False, username="cam-p", password=secret).connect()
    assert not Client(plain, tls=False).connect()
    enrol.revoke_device(f["cfg"], f["sec"], f["store"], "cam-p")
    wait_for(lambda: not Client(port, **tls, username="cam-p", password=secret).connect(), 15,
             what="the revoked password refused")


def test_both_needs_the_certificate_and_the_password(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    f = fleet(mqtt_auth="both")
    d = add(f, "cam-2f", "g1", tmp_path)
    secret = d["mqtt-password"].read_text().strip()
    assert Client(f["port"], **device_tls(d), username="cam-2f", password=secret).connect()
    assert not Client(f["port"], **device_tls(d)).connect()
    assert not Client(f["port"], ca=str(d["ca.crt"]), username="cam-2f", password=secret).connect()


def test_set_group_moves_the_acl(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    f = fleet()
    d = add(f, "cam-m", "g1", tmp_path)
    hub = Client(f["port"], **f["hub"])
    assert hub.connect()
    hub.publish(topics.group_desired("g2"), b"order-g2", retain=True)
    enrol.set_group(f["cfg"], f["sec"], f["store"], "cam-m", "g2")
    assert f["store"].get_device("cam-m").enrolled_group == "g2"

    def reads_g2() -> bool:
        c = Client(f["port"], **device_tls(d))
        try:
            if not c.connect():
                return False
            c.subscribe(topics.group_desired("g2"))
            wait_for(lambda: bool(c.messages), 2, what="g2's order")
            return True
        except AssertionError:
            return False
        finally:
            c.close()

    wait_for(reads_g2, 15, what="cam-m reads g2 after the move")
    hub.close()


# ---- the real hub ----

def test_the_real_hub_with_enrolled_devices(tmp_path: Path) -> None:
    """`kestrel-hub serve` on its defaults (TLS, client certificates) with two devices enrolled by
    `kestrel-hub devices add`: A's frame on B's topic and A's forged retained status for B never reach
    the store or the fleet view; `devices revoke` (another process) keeps B out; `devices` lists both."""
    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data)
    hub = HubProcess(cfg, data, tmp_path / "hub.log").start()
    try:
        port = int(hub.info["mqtt_port"])  # type: ignore[arg-type]
        a = enrol_cli(cfg, "cam-a", tmp_path / "ids", "--group", "g1")
        b = enrol_cli(cfg, "cam-b", tmp_path / "ids", "--group", "g2")
        ta = {"ca_file": str(a["ca.crt"]), "cert_file": str(a["device.crt"]), "key_file": str(a["device.key"])}
        tb = {"ca_file": str(b["ca.crt"]), "cert_file": str(b["device.crt"]), "key_file": str(b["device.key"])}
        status_b = kestrel_pb2.Status(device_id="cam-b", state="online", group="g2",
                                      model=kestrel_pb2.ModelRef(name="m", version=3))
        publish_all("127.0.0.1", port, [(topics.status("cam-b"), status_b.SerializeToString())], **tb)
        store = SqliteStore(data / "hub.db")
        def b_online() -> bool:
            dev = store.get_device("cam-b")
            return dev is not None and dev.state == "online"

        wait_for(b_online, 15, what="B's own status")
        forged = kestrel_pb2.Status(device_id="cam-b", state="online", group="evil",
                                    model=kestrel_pb2.ModelRef(name="m", version=99))
        publish_all("127.0.0.1", port, [(topics.frames("cam-b"), frame_payload("forged-1", "cam-b")),
                                        (topics.status("cam-b"), forged.SerializeToString()),
                                        (topics.frames("cam-a"), frame_payload("own-1", "cam-a"))], **ta)
        wait_for(lambda: store.get_frame("own-1") is not None, 15, what="A's own frame stored")
        assert store.get_frame("forged-1") is None
        with hub.grpc_client() as client:
            (dev_b,) = [d for d in client.list_devices() if d.device_id == "cam-b"]
        assert (dev_b.group, dev_b.reported.version, dev_b.enrolled_group) == ("g2", 3, "g2")
        r = subprocess.run([sys.executable, "-m", "hub", "devices", "revoke", "cam-b", "--config", str(cfg)],
                           cwd=str(REPO), capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                           timeout=60)
        assert r.returncode == 0 and "embedded broker reloaded" in r.stdout, r.stderr
        wait_for(lambda: not Client(port, ca=tb["ca_file"], cert=tb["cert_file"], key=tb["key_file"]).connect(),
                 15, what="the revoked device refused by the running hub's broker")
        r = subprocess.run([sys.executable, "-m", "hub", "devices", "--hub", f"127.0.0.1:{hub.info['grpc_port']}",
                            "--config", str(cfg)],  # its admin token and fleet CA from the hub's data
                           cwd=str(REPO), capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                           timeout=60)
        assert r.returncode == 0, r.stderr
        rows = {ln.split()[0]: ln for ln in r.stdout.splitlines()[1:]}
        assert "enrolled (g1)" in rows["cam-a"] and "revoked" in rows["cam-b"]
        # enrolling an enrolled device again needs --force: one line, exit 2
        r = subprocess.run([sys.executable, "-m", "hub", "devices", "add", "cam-a", "--config", str(cfg)],
                           cwd=str(REPO), capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                           timeout=60)
        assert r.returncode == 2 and "enrolled already" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        # no secret in the hub's log, /metrics, /healthz or hub.json
        import urllib.request

        base = f"http://127.0.0.1:{hub.info['http_port']}"
        exposed = (tmp_path / "hub.log").read_text() + (data / "hub.json").read_text()
        for path in ("/metrics", "/healthz"):
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                exposed += resp.read().decode()
        hub_password = (data / "security" / "hub-mqtt-password").read_text().strip()
        assert hub_password not in exposed and "PRIVATE KEY" not in exposed
        store.close()
    finally:
        assert hub.stop() == 0


def _ca_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hub", "ca", *args, "--config", str(config)], cwd=str(REPO),
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)


def test_ca_rotation_keeps_devices_in_until_they_are_re_enrolled(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    f = fleet()
    cfg, store, port = f["cfg"], f["store"], f["port"]
    toml = tmp_path / "hub.toml"
    toml.write_text(f'[hub]\ndata_dir = "{cfg.data_dir}"\n')
    old = add(f, "cam-old", "g1", tmp_path)
    brokers = []

    def restart_broker() -> enrol.Security:
        """What restarting `kestrel-hub serve` does to its embedded broker (the CAs are loaded at start)."""
        for b in [f["broker"], *brokers]:
            b.stop()
        sec = enrol.Security(cfg)
        sec.write_broker_files(store)
        brokers.append(EmbeddedBroker(cfg.data_dir / "broker", port=port,
                                      listener=lambda p: sec.conf_lines(p, "127.0.0.1")).start())
        return sec

    try:
        r = _ca_cli(toml, "rotate")
        assert r.returncode == 0 and "rotation started" in r.stdout, r.stderr
        sec = restart_broker()
        assert Client(port, **device_tls(old)).connect()  # enrolled before the rotation: still in
        new = extract(enrol.add_device(cfg, sec, store, "cam-new", "g1", tmp_path / "b2").bundle, tmp_path / "n")
        assert new["ca.crt"].read_bytes().count(b"BEGIN CERTIFICATE") == 2  # both CAs during the rotation
        assert Client(port, **device_tls(new)).connect()
        r = _ca_cli(toml, "finish")
        assert r.returncode == 2 and "cam-old" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert json.loads(_ca_cli(toml, "status", "--json").stdout)["devices_on_previous_ca"] == ["cam-old"]
        old2 = extract(enrol.add_device(cfg, sec, store, "cam-old", "g1", tmp_path / "b3", force=True).bundle,
                       tmp_path / "o2")
        r = _ca_cli(toml, "finish")
        assert r.returncode == 0 and "rotation finished" in r.stdout, r.stderr
        sec = restart_broker()
        assert sec.ca.previous is None
        assert not Client(port, **device_tls(old)).connect()  # the previous CA is no longer trusted
        assert Client(port, **device_tls(old2)).connect() and Client(port, **device_tls(new)).connect()
        hub = sec.hub_identity()
        assert Client(port, ca=hub.ca_file, cert=hub.cert_file, key=hub.key_file).connect()
    finally:
        for b in brokers:
            b.stop()


def test_broker_config_for_an_operators_broker(tmp_path: Path) -> None:
    """`kestrel-hub broker-config --out DIR`: a Mosquitto started on DIR/mosquitto.conf lets an enrolled
    device in and refuses a client without a certificate."""
    from tests.helpers.broker import free_port

    data = tmp_path / "hub"
    cfg = write_config(tmp_path / "hub.toml", data, "broker.example", 8883)  # the hub uses an external broker
    d = enrol_cli(cfg, "cam-op", tmp_path / "ids", "--group", "g1", "--mqtt", "127.0.0.1:8883")
    port = free_port()
    out = tmp_path / "operator"
    r = subprocess.run([sys.executable, "-m", "hub", "broker-config", "--config", str(cfg), "--out", str(out),
                        "--port", str(port), "--bind", "127.0.0.1"], cwd=str(REPO), capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'cert_file = "' in r.stdout and "hub.crt" in r.stdout  # how the hub connects to it
    assert f"max_packet_size {packet_limit(4 * 1024 * 1024)}\n" in (out / "mosquitto.conf").read_text()
    assert "\nset_tcp_nodelay true\n" in (out / "mosquitto.conf").read_text()  # Mosquitto starts on it below
    for name in ("broker.key", "passwd", "acl"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600
    conf = out / "mosquitto.conf"
    extra = [f"log_dest file {out / 'mosquitto.log'}"] + (["user root"] if os.geteuid() == 0 else [])
    conf.write_text(conf.read_text() + "\n".join(extra) + "\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=str(out))  # its mosquitto.db (persistence) lands there, not in the checkout
    try:
        from hub.broker import port_open

        wait_for(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, 10, what="mosquitto listening")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert Client(port, **device_tls(d)).connect()
        assert not Client(port, ca=str(d["ca.crt"])).connect()
        sec = data / "security"
        hub = {"ca": str(sec / "ca-bundle.crt"), "cert": str(sec / "hub.crt"), "key": str(sec / "hub.key")}
        assert Client(port, **hub).connect()
    finally:
        proc.terminate()
        proc.wait(10)
