"""The device identity bundle (``kestrel-hub devices add NAME`` writes ``NAME.identity.tar``) and the device's
``/etc/kestrel/edge.toml`` made from the overlay's template with it.

The bundle is a flat ustar tar: ``identity.json`` and ``edge.toml`` (an edge.toml snippet) always, the
fleet CA and the device's certificate and key, optionally its MQTT password, gRPC token and the fleet's
desired-state key (docs/jetson.md, "The device identity"). The snippet's settings are merged into the
template with tomlkit, which keeps the template's comments; the result is validated with the edge's own
config loader before anything is written, so a snippet this Kestrel does not understand stops the build.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Dict, Optional

from jetson.errors import ImageInputError

CREDENTIALS_DIR = "/etc/kestrel/credentials"
# member -> (is a secret, required)
MEMBERS: Dict[str, tuple] = {
    "identity.json": (False, True),
    "edge.toml": (False, True),
    "ca.crt": (False, False),
    "device.crt": (False, False),
    "device.key": (True, False),
    "mqtt-password": (True, False),
    "grpc-token": (True, False),
    "fleet.pub": (False, False),
}
MAX_MEMBER_BYTES = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclasses.dataclass
class Identity:
    path: Path
    device_id: str
    group: str
    info: Dict[str, Any]
    members: Dict[str, bytes]   # every member but identity.json and edge.toml: installed under credentials/
    snippet: str                # the edge.toml snippet

    def secret(self, member: str) -> bool:
        return bool(MEMBERS[member][0])


def read_identity(path: Optional[str]) -> Identity:
    """Read and check ``NAME.identity.tar``; ImageInputError (exit 2) with what is wrong and what to do."""
    if not path:
        raise ImageInputError("missing device identity: pass IDENTITY=NAME.identity.tar (made on the hub by "
                              "`kestrel-hub devices add NAME --group GROUP`)")
    p = Path(path)
    if not p.is_file():
        raise ImageInputError(f"device identity {p} does not exist (make it on the hub with "
                              "`kestrel-hub devices add NAME`)")
    try:
        with tarfile.open(p, "r:") as tar:
            found: Dict[str, bytes] = {}
            for m in tar.getmembers():
                if not m.isfile() or "/" in m.name or m.name not in MEMBERS:
                    raise ImageInputError(f"device identity {p}: unexpected member {m.name!r} (a flat tar of "
                                          f"{', '.join(MEMBERS)})")
                if m.size > MAX_MEMBER_BYTES:
                    raise ImageInputError(f"device identity {p}: member {m.name} is {m.size} bytes; too large")
                f = tar.extractfile(m)
                assert f is not None
                found[m.name] = f.read()
    except tarfile.TarError as exc:
        raise ImageInputError(f"device identity {p} is not a tar file ({exc})") from exc
    for name, (_secret, required) in MEMBERS.items():
        if required and name not in found:
            raise ImageInputError(f"device identity {p} has no {name}: make it again with `kestrel-hub devices add`")
    try:
        info = json.loads(found.pop("identity.json"))
    except ValueError as exc:
        raise ImageInputError(f"device identity {p}: identity.json is not JSON ({exc})") from exc
    if not isinstance(info, dict) or info.get("schema") != 1:
        raise ImageInputError(f"device identity {p}: identity.json schema {info.get('schema') if isinstance(info, dict) else None!r} "  # noqa: E501
                              "is not 1; this Kestrel reads schema 1")
    device_id, group = str(info.get("device_id", "")), str(info.get("group", "") or "default")
    if not _NAME.match(device_id):
        raise ImageInputError(f"device identity {p}: device_id {device_id!r} is not a device name "
                              "(letters, digits, '-', '_', '.')")
    snippet = found.pop("edge.toml").decode("utf-8", errors="strict")
    if ("device.crt" in found) != ("device.key" in found):
        raise ImageInputError(f"device identity {p}: device.crt and device.key come together")
    return Identity(p, device_id, group, info, found, snippet)


def device_config(template: str, ident: Identity, load_credential: bool) -> str:
    """The device's edge.toml: the template with the identity's snippet merged in, table by table.

    With ``load_credential`` (systemd >= 247) secret files that point into /etc/kestrel/credentials/ are
    named by their bare member name, which the daemon finds in $CREDENTIALS_DIRECTORY (the unit's
    LoadCredential=); otherwise they keep their paths, readable through the kestrel group.
    """
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    from edge import config as edge_config

    try:
        doc = tomlkit.parse(template)
        snippet = tomlkit.parse(ident.snippet)
    except TOMLKitError as exc:
        raise ImageInputError(f"device identity {ident.path}: its edge.toml is not valid TOML ({exc})") from exc
    for table, values in snippet.items():
        if not isinstance(values, dict):
            raise ImageInputError(f"device identity {ident.path}: edge.toml key {table!r} is not a table")
        if table not in doc:
            doc[table] = tomlkit.table()
        for key, value in values.items():
            doc[table][key] = value  # type: ignore[index]
    device = doc.setdefault("device", tomlkit.table())
    device["id"] = ident.device_id  # identity.json is authoritative for who the device is
    device["group"] = ident.group
    if load_credential:
        for table, key in (("mqtt", "password_file"), ("mqtt", "key_file"), ("update", "token_file")):
            value = str(doc.get(table, {}).get(key, ""))
            member = value.rsplit("/", 1)[-1]
            if value.startswith(CREDENTIALS_DIR + "/") and member in MEMBERS and MEMBERS[member][0]:
                doc[table][key] = member  # type: ignore[index]
    text = tomlkit.dumps(doc)
    try:
        edge_config.from_dict(tomlkit.parse(text).unwrap())
    except Exception as exc:  # ConfigError: one line saying which key
        raise ImageInputError(f"device identity {ident.path}: the device's edge.toml would be invalid: {exc}") \
            from exc
    return text
