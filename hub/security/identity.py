"""The device identity bundle: ONE plain ustar file ``NAME.identity.tar`` (mode 0600) with flat members,
the contract between ``kestrel-hub devices add`` and the Jetson image builder (docs/security.md,
*Identity bundle*): identity.json, edge.toml (a snippet merged into the device's edge.toml),
ca.crt, device.crt, device.key, and when used mqtt-password, grpc-token, fleet.pub. Members carry
the mode they get on the device (secrets 0600, the rest 0644), owner root, and the bundle's time.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from proto import atomic

SCHEMA = 1
CREDENTIALS_DIR = "/etc/kestrel/credentials"
TRUST_DIR = "/etc/kestrel/trust"
SECRET_MEMBERS = ("device.key", "mqtt-password", "grpc-token")
MEMBER_ORDER = ("identity.json", "edge.toml", "ca.crt", "device.crt", "device.key", "mqtt-password",
                "grpc-token", "fleet.pub")


@dataclass
class Identity:
    device_id: str
    group: str
    mqtt_host: str
    mqtt_port: int
    hub_grpc: str
    created_ms: int
    ca_pem: bytes
    cert_pem: Optional[bytes] = None
    key_pem: Optional[bytes] = None
    password: Optional[str] = None
    grpc_token: Optional[str] = None
    fleet_pub: Optional[str] = None


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for these values (no control chars)


def edge_toml(ident: Identity, credentials_dir: str = CREDENTIALS_DIR, trust_dir: str = TRUST_DIR) -> str:
    """The edge.toml snippet: [device], [mqtt] and [update] settings of this identity."""
    def cred(member: str) -> str:
        return _toml_str(f"{credentials_dir.rstrip('/')}/{member}")

    lines = [f"# Kestrel identity of {ident.device_id} (kestrel-hub devices add): merge into /etc/kestrel/edge.toml",
             "[device]", f"id = {_toml_str(ident.device_id)}", f"group = {_toml_str(ident.group)}", "",
             "[mqtt]", f"host = {_toml_str(ident.mqtt_host)}", f"port = {int(ident.mqtt_port)}", "tls = true",
             f"ca_file = {cred('ca.crt')}"]
    if ident.cert_pem is not None:
        lines += [f"cert_file = {cred('device.crt')}", f"key_file = {cred('device.key')}"]
    if ident.password is not None:
        lines += [f"username = {_toml_str(ident.device_id)}", f"password_file = {cred('mqtt-password')}"]
    lines += ["", "[update]", f"hub_grpc = {_toml_str(ident.hub_grpc)}", f"trust_dir = {_toml_str(trust_dir)}",
              "tls = true", f"ca_file = {cred('ca.crt')}"]
    if ident.grpc_token is not None:
        lines += [f"token_file = {cred('grpc-token')}"]
    if ident.fleet_pub is not None:
        lines += [f"fleet_keys = [{cred('fleet.pub')}]", "require_signed_desired = true"]
    return "\n".join(lines) + "\n"


def members(ident: Identity, credentials_dir: str = CREDENTIALS_DIR) -> List[Tuple[str, bytes]]:
    doc = {"schema": SCHEMA, "device_id": ident.device_id, "group": ident.group, "mqtt_host": ident.mqtt_host,
           "mqtt_port": int(ident.mqtt_port), "hub_grpc": ident.hub_grpc, "created_ms": int(ident.created_ms)}
    out: Dict[str, bytes] = {
        "identity.json": (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode(),
        "edge.toml": edge_toml(ident, credentials_dir).encode(),
        "ca.crt": ident.ca_pem,
    }
    if ident.cert_pem is not None and ident.key_pem is not None:
        out["device.crt"] = ident.cert_pem
        out["device.key"] = ident.key_pem
    if ident.password is not None:
        out["mqtt-password"] = (ident.password + "\n").encode()
    if ident.grpc_token is not None:
        out["grpc-token"] = (ident.grpc_token + "\n").encode()
    if ident.fleet_pub is not None:
        out["fleet.pub"] = ident.fleet_pub.encode()
    return [(name, out[name]) for name in MEMBER_ORDER if name in out]


def bundle_bytes(ident: Identity, credentials_dir: str = CREDENTIALS_DIR) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members(ident, credentials_dir):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600 if name in SECRET_MEMBERS else 0o644
            info.mtime = ident.created_ms // 1000
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_bundle(path: Path, ident: Identity, credentials_dir: str = CREDENTIALS_DIR) -> Path:
    """Write the bundle atomically with mode 0600 (it holds the device's private key)."""
    atomic.write_bytes(path, bundle_bytes(ident, credentials_dir), mode=0o600)
    path.chmod(0o600)
    return path


def read_bundle(path: Path) -> Dict[str, bytes]:
    """name -> content of every member (tests and the demo)."""
    out: Dict[str, bytes] = {}
    with tarfile.open(str(path), mode="r:") as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            if f is not None:
                out[m.name] = f.read()
    return out
