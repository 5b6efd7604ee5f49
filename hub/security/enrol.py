"""The hub's security material in one place (``Security``) and the enrolment operations that change it:
``add_device`` (a certificate and/or password, a gRPC token of role ``device``, the store's enrolment
record, the identity bundle), ``revoke_device`` (CRL, ACL and password file, the token, the store) and
``set_group``. Each of them rewrites
the broker's files and reloads the embedded broker (SIGHUP: Mosquitto 2 rereads the ACL, the
password file, the CRL and its certificates without dropping the other clients).

Used by ``kestrel-hub devices add|revoke|set-group`` (a process of its own, next to a running hub:
SQLite's WAL and the atomic file writes let both work) and by ``kestrel-hub serve`` at start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from hub import auth
from hub.config import HubConfig
from hub.errors import SecurityError
from hub.security import mosquitto
from hub.security.ca import (
    KIND_BROKER,
    KIND_DEVICE,
    KIND_GRPC,
    KIND_HUB,
    TRUST_FILE,
    FleetCA,
    crl_next_update_ms,
    write_secret,
)
from hub.security.fleetkey import FleetSigner
from hub.security.identity import Identity, write_bundle
from hub.store.base import DeviceRecord, Store
from proto import atomic, topics
from proto.clock import now_ms

log = logging.getLogger("hub.security")

NAME_RULE = "1-64 of letters, digits, '.', '_', '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BROKER_CERT, BROKER_KEY = "broker.crt", "broker.key"
HUB_CERT, HUB_KEY, HUB_PASSWORD = "hub.crt", "hub.key", "hub-mqtt-password"
ACL_FILE, PASSWD_FILE, BROKER_NAMES = "acl", "passwd", "broker-names.json"
GRPC_CERT, GRPC_KEY, GRPC_NAMES = "grpc.crt", "grpc.key", "grpc-names.json"
RENEW_BEFORE_MS = 30 * 86400 * 1000  # a broker/hub certificate this close to its end is issued again


def check_name(value: str, what: str) -> str:
    """A device id or group as the ACL, the certificate and the topics need it."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise SecurityError(f"invalid {what} {value!r}: {NAME_RULE}")
    return value


def enrolled(store: Store) -> List[Tuple[str, str]]:
    """(device id, enrolled group) of every enrolled, unrevoked device."""
    return [(d.device_id, d.enrolled_group) for d in store.list_devices() if d.enrolled_ms and not d.revoked_ms]


@dataclass
class HubIdentity:
    """How the hub connects to the fleet's broker."""
    ca_file: str
    cert_file: str
    key_file: str
    username: str
    password: str = field(repr=False)  # a secret: never in a log line or repr


class Security:
    """The CA, the fleet key and the broker's files of one hub config (created at first use)."""

    def __init__(self, cfg: HubConfig) -> None:
        self.cfg = cfg
        self.s = cfg.security
        self.dir = cfg.security_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(str(self.dir), 0o700)
        self.ca = FleetCA(self.dir, self.s.ca_cert_file, self.s.ca_key_file)
        self.signer = FleetSigner(self.dir, self.s.fleet_key_file, self.s.desired_ttl_s)
        check_name(self.s.hub_identity, "[security] hub_identity")
        self._new_hub_password = False

    # ---- paths ----
    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca_file(self) -> Path:
        """ca-bundle.crt: the CA certificates the broker and the hub trust (both during a rotation)."""
        path = self.path(TRUST_FILE)
        data = self.ca.trust_bytes
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            current = b""
        if current != data:
            atomic.write_bytes(path, data)
        return path

    @property
    def fleet_pub(self) -> str:
        return self.signer.public_text

    def listener_files(self) -> mosquitto.ListenerFiles:
        return mosquitto.ListenerFiles(cafile=str(self.ca_file), certfile=str(self.path(BROKER_CERT)),
                                       keyfile=str(self.path(BROKER_KEY)), crlfile=str(self.path("crl.pem")),
                                       aclfile=str(self.path(ACL_FILE)), passwdfile=str(self.path(PASSWD_FILE)))

    # ---- the broker's and the hub's own certificates ----
    def _needs_cert(self, cert_path: Path, issuer: FleetCA, names: Optional[List[str]] = None,
                    names_file: str = BROKER_NAMES) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError):
            return True
        try:
            cert.verify_directly_issued_by(issuer.cert)
        except (ValueError, TypeError, InvalidSignature):
            return True  # issued by another CA (a rotation)
        if cert.serial_number in revoked(issuer):
            return True
        if int(cert.not_valid_after_utc.timestamp() * 1000) - now_ms() < RENEW_BEFORE_MS:
            return True
        if names is not None:
            try:
                stored = json.loads(self.path(names_file).read_text())
            except (OSError, ValueError):
                return True
            return bool(stored != names)
        return False

    def ensure_broker_cert(self) -> None:
        names = list(self.s.broker_names)
        issuer = self.ca.server_issuer
        if self._needs_cert(self.path(BROKER_CERT), issuer, names):
            cert, key, _ = issuer.issue(names[0], KIND_BROKER, self.s.cert_days, sans=names)
            write_secret(self.path(BROKER_KEY), key)
            atomic.write_bytes(self.path(BROKER_CERT), cert)
            atomic.write_json(self.path(BROKER_NAMES), names)
            log.info("issued the broker's certificate for %s", ", ".join(names))

    def grpc_tls(self) -> Tuple[bytes, bytes]:
        """(key PEM, certificate PEM) of the hub's gRPC server: SANs ``[grpc] tls_names`` (empty = ``[security]
        broker_names``), issued like the broker's (by the previous CA during a rotation: the devices enrolled
        before it trust only that one), again when the names change or the end nears."""
        names = list(self.cfg.grpc.tls_names or self.s.broker_names)
        issuer = self.ca.server_issuer
        if self._needs_cert(self.path(GRPC_CERT), issuer, names, GRPC_NAMES):
            cert, key, _ = issuer.issue(names[0], KIND_GRPC, self.s.cert_days, sans=names)
            write_secret(self.path(GRPC_KEY), key)
            atomic.write_bytes(self.path(GRPC_CERT), cert)
            atomic.write_json(self.path(GRPC_NAMES), names)
            log.info("issued the gRPC server's certificate for %s", ", ".join(names))
        return self.path(GRPC_KEY).read_bytes(), self.path(GRPC_CERT).read_bytes()

    def hub_identity(self) -> HubIdentity:
        """The hub's MQTT identity: a client certificate (CN = hub_identity) and a password, issued at
        first use (and again before the certificate runs out)."""
        name = self.s.hub_identity
        if self._needs_cert(self.path(HUB_CERT), self.ca):
            cert, key, entry = self.ca.issue(name, KIND_HUB, self.s.cert_days)
            write_secret(self.path(HUB_KEY), key)
            atomic.write_bytes(self.path(HUB_CERT), cert)
            self.ca.revoke(name, KIND_HUB, except_serial=entry.serial)
        pw_path = self.path(HUB_PASSWORD)
        if not pw_path.exists():
            write_secret(pw_path, (secrets.token_urlsafe(32) + "\n").encode())
            self._new_hub_password = True  # its hash in the password file is rewritten
        return HubIdentity(ca_file=str(self.ca_file), cert_file=str(self.path(HUB_CERT)),
                           key_file=str(self.path(HUB_KEY)), username=name,
                           password=pw_path.read_text().strip())

    # ---- the broker's access files ----
    def write_broker_files(self, store: Store) -> mosquitto.ListenerFiles:
        """Broker certificate, CRL, ACL and password file for the devices enrolled in ``store``."""
        self.ensure_broker_cert()
        ident = self.hub_identity()
        devices = enrolled(store)
        self.ca.write_crl(self.s.crl_days, self.path("crl.pem"))
        atomic.write_bytes(self.path(ACL_FILE), mosquitto.acl_text(ident.username, devices).encode(), mode=0o600)
        passwd = self.path(PASSWD_FILE)
        old = mosquitto.read_passwords(passwd)
        keep = {d for d, _ in devices}
        lines = {u: v for u, v in old.items() if u in keep}  # a revoked device's password goes
        if self.s.mqtt_auth != "certificate" or self.s.plain_port:  # the hub logs in with its password
            hub_line = old.get(ident.username)
            if hub_line is None or self._new_hub_password:
                hub_line = mosquitto.hash_password(ident.username, ident.password)
                self._new_hub_password = False
            lines[ident.username] = hub_line
        mosquitto.write_passwords(passwd, lines)
        return self.listener_files()

    def conf_lines(self, port: int, bind: str) -> List[str]:
        return mosquitto.conf_lines(self.listener_files(), port, bind, self.s.mqtt_auth, self.s.plain_port)

    def crl_due(self) -> bool:
        """Less than half of the CRL's validity is left (or there is none)."""
        left = crl_next_update_ms(self.path("crl.pem")) - now_ms()
        return left < self.s.crl_days * 86400 * 1000 / 2


def revoked(ca: FleetCA) -> set:
    """Serials (int) ``ca`` revoked."""
    return {int(e.serial, 16) for e in ca.issued() if e.revoked_ms}


def devices_on_previous_ca(store: Store, ca: FleetCA) -> List[str]:
    """Enrolled, unrevoked devices whose only valid certificate is from the previous CA of a rotation."""
    current = {e.name for e in ca.issued() if e.kind == KIND_DEVICE and not e.revoked_ms}
    return sorted(d for d, _ in enrolled(store) if d not in current)


# ---- the embedded broker ----

def reload_embedded_broker(cfg: HubConfig) -> bool:
    """SIGHUP to the hub's embedded Mosquitto (from <data_dir>/broker/broker.json) when it runs; False
    when there is none (its files are read at its next start)."""
    info = cfg.data_dir / "broker" / "broker.json"
    try:
        pid = int(json.loads(info.read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not cmdline or b"mosquitto" not in os.path.basename(cmdline[0]) or \
            str(cfg.data_dir / "broker" / "mosquitto.conf").encode() not in cmdline:
        return False  # the pid is no longer our broker
    os.kill(pid, signal.SIGHUP)
    log.info("reloaded the embedded broker (pid %d)", pid)
    return True


def apply(cfg: HubConfig, sec: Security, store: Store) -> bool:
    sec.write_broker_files(store)
    return reload_embedded_broker(cfg) if cfg.mqtt.embedded else False


# ---- enrolment ----

@dataclass
class Enrolment:
    record: DeviceRecord
    bundle: Path
    serial: str
    password: bool
    reloaded: bool


def advertised(cfg: HubConfig, mqtt: Optional[Tuple[str, int]] = None, hub_grpc: str = "") -> Tuple[str, int, str]:
    """(mqtt host, mqtt port, hub gRPC) devices are told to use (``mqtt``/``hub_grpc`` given: those)."""
    s = cfg.security
    mqtt_host, mqtt_port = "127.0.0.1", cfg.mqtt.embedded_port
    if mqtt is not None:
        mqtt_host, mqtt_port = mqtt
    elif s.advertise_mqtt:
        host, _, port_text = s.advertise_mqtt.rpartition(":")
        if not host or not port_text.isdigit():
            raise SecurityError(f"[security] advertise_mqtt {s.advertise_mqtt!r} must be host:port")
        mqtt_host, mqtt_port = host, int(port_text)
    elif not cfg.mqtt.embedded:
        mqtt_host, mqtt_port = cfg.mqtt.host, cfg.mqtt.port or 8883
    elif s.embedded_bind not in ("127.0.0.1", "localhost", "::1"):
        mqtt_host = s.broker_names[0]  # devices on the network: the first name the certificate carries
    if mqtt is None and not s.advertise_mqtt and cfg.mqtt.embedded and not mqtt_port:
        try:
            mqtt_port = int(json.loads((cfg.data_dir / "broker" / "broker.json").read_text())["port"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SecurityError("the embedded broker's port is not known yet: start `kestrel-hub serve` "
                                "once, or set [mqtt] embedded_port or [security] advertise_mqtt") from exc
    grpc = hub_grpc or cfg.grpc.advertise
    if not grpc:
        grpc_port = cfg.grpc.port
        if not grpc_port:
            try:
                grpc_port = int(json.loads((cfg.data_dir / "hub.json").read_text())["grpc_port"])
            except (OSError, ValueError, KeyError, TypeError):
                grpc_port = 50051
        grpc = f"{'127.0.0.1' if cfg.grpc.bind in ('0.0.0.0', '') else cfg.grpc.bind}:{grpc_port}"
    return mqtt_host, mqtt_port, grpc


def add_device(cfg: HubConfig, sec: Security, store: Store, name: str, group: str, out_dir: Path, *,
               password: bool = False, force: bool = False, mqtt: Optional[Tuple[str, int]] = None,
               hub_grpc: str = "") -> Enrolment:
    check_name(name, "device name")
    check_name(group, "group")
    topics.check_segment(name, "device id")
    if name == cfg.security.hub_identity:
        raise SecurityError(f"{name!r} is the hub's own MQTT identity ([security] hub_identity): pick another name")
    if password is False and cfg.security.mqtt_auth in ("password", "both"):
        password = True  # the broker asks every client for one
    existing = store.get_device(name)
    if existing is not None and existing.enrolled_ms and not existing.revoked_ms and not force:
        raise SecurityError(f"device {name!r} is enrolled already (group {existing.enrolled_group!r}): "
                            "`--force` issues a new identity and revokes the old one")
    host, port, grpc = advertised(cfg, mqtt, hub_grpc)
    cert, key, entry = sec.ca.issue(name, KIND_DEVICE, cfg.security.cert_days)
    sec.ca.revoke(name, KIND_DEVICE, except_serial=entry.serial)  # a re-issued identity ends the old one
    secret = secrets.token_urlsafe(24) if password else None
    passwd = sec.path(PASSWD_FILE)
    lines = mosquitto.read_passwords(passwd)
    lines.pop(name, None)
    if secret is not None:
        lines[name] = mosquitto.hash_password(name, secret)
    mosquitto.write_passwords(passwd, lines)
    created = now_ms()
    token = auth.replace_device_token(store, name)  # role device: fetch only; an old one is revoked
    ident = Identity(device_id=name, group=group, mqtt_host=host, mqtt_port=port, hub_grpc=grpc,
                     created_ms=created, ca_pem=sec.ca.trust_bytes, cert_pem=cert, key_pem=key, password=secret,
                     grpc_token=token, fleet_pub=sec.fleet_pub)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = write_bundle(out_dir / f"{name}.identity.tar", ident)
    fields = {"enrolled_group": group, "enrolled_ms": created, "revoked_ms": 0}
    if existing is None or not existing.last_seen_ms:
        fields["group"] = group  # its group until it reports one
    rec = store.upsert_device(name, **fields)
    reloaded = apply(cfg, sec, store)
    log.info("enrolled %s in group %s (certificate %s%s)", name, group, entry.serial,
             ", password" if secret else "")
    return Enrolment(rec, bundle, entry.serial, secret is not None, reloaded)


def revoke_device(cfg: HubConfig, sec: Security, store: Store, name: str) -> Tuple[DeviceRecord, int, bool]:
    """Revoke every certificate of ``name``, drop its password and ACL block, mark it revoked.
    Returns (record, certificates revoked, broker reloaded)."""
    dev = store.get_device(name)
    if dev is None or not dev.enrolled_ms:
        raise SecurityError(f"device {name!r} was never enrolled (see `kestrel-hub devices list`)")
    n = sec.ca.revoke(name, KIND_DEVICE)
    auth.revoke_device_token(store, name)  # it may fetch no more
    rec = store.upsert_device(name, revoked_ms=dev.revoked_ms or now_ms())
    reloaded = apply(cfg, sec, store)  # CRL, ACL and password file without it
    log.info("revoked %s (%d certificate(s))", name, n)
    return rec, n, reloaded


def set_group(cfg: HubConfig, sec: Security, store: Store, name: str, group: str) -> Tuple[DeviceRecord, bool]:
    check_name(group, "group")
    dev = store.get_device(name)
    if dev is None or not dev.enrolled_ms or dev.revoked_ms:
        raise SecurityError(f"device {name!r} is not enrolled (or revoked): `kestrel-hub devices add` it first")
    rec = store.upsert_device(name, enrolled_group=group)
    return rec, apply(cfg, sec, store)

