"""The edge.toml the loop (demo/loop.py) writes for its device, and the identity it runs with.

The device's identity bundle (`kestrel-hub devices add`) is unpacked as systemd's ``LoadCredential=``
would hand it to the edge daemon: every member in one private directory (the daemon's
``$CREDENTIALS_DIRECTORY``), secrets 0600, and the bundle's edge.toml snippet with its
/etc/kestrel/credentials/ paths made bare names, which the daemon looks up there (edge.credentials).
The demo and tests/e2e run the device so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

from hub.security.identity import CREDENTIALS_DIR, SECRET_MEMBERS, read_bundle
from proto.tomlconf import tomllib


def _bare(value: Any, prefix: str) -> Any:
    if isinstance(value, str) and value.startswith(prefix):
        return value[len(prefix):]
    if isinstance(value, list):
        return [_bare(v, prefix) for v in value]
    return value


def unpack_identity(bundle: Path, credentials: Path) -> Dict[str, Any]:
    """Write the bundle's members into ``credentials`` (0700); return its edge.toml snippet (parsed) with
    credential paths made relative. ValueError when a member would land outside the directory."""
    credentials.mkdir(mode=0o700, exist_ok=True)
    for name, data in read_bundle(bundle).items():
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"unexpected member {name!r} in the identity bundle {bundle}")
        path = credentials / name
        path.write_bytes(data)
        path.chmod(0o600 if name in SECRET_MEMBERS else 0o644)  # secrets stay private
    prefix = CREDENTIALS_DIR.rstrip("/") + "/"
    snippet = tomllib.loads((credentials / "edge.toml").read_text())
    return {table: {key: _bare(value, prefix) for key, value in section.items()}
            for table, section in snippet.items()}


UPDATE_KEYS = ("fleet_keys", "require_signed_desired", "tls", "ca_file", "token_file")


def identity_settings(identity: Dict[str, Any], fleet_pub: Path,
                      grpc_access: Callable[[], Tuple[str, str]]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The [mqtt] and [update] settings the device takes from its unpacked identity: the broker, TLS files,
    fleet keys, the hub's CA and its gRPC token. No identity (a hub on its quick-try opt-out, ``[security]
    tls = false``): the device trusts the hub's fleet key ``fleet_pub`` directly (desired state stays
    signed) and fetches over TLS with ``grpc_access()`` = (CA file, token file of role device)."""
    if not identity:
        ca_file, token_file = grpc_access()
        return {}, {"fleet_keys": [str(fleet_pub)], "ca_file": ca_file, "token_file": token_file}
    update = {k: v for k, v in identity["update"].items() if k in UPDATE_KEYS}
    return dict(identity["mqtt"]), update


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string for what we write


def toml_doc(sections: Mapping[str, Mapping[str, Any]]) -> str:
    out: List[str] = []
    for name, fields in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in fields.items())
    return "\n".join(out) + "\n"
