"""``kestrel-hub broker-config --out DIR``: the Mosquitto configuration for an operator's broker.

Writes into DIR what the embedded broker runs with: ``mosquitto.conf`` (TLS listener, client
certificates and/or passwords, ACL, CRL; persistence, the in-flight window the ingest needs and the
``max_packet_size`` its frame limit asks for),
``ca.crt``, ``broker.crt``, ``broker.key`` (0600), ``crl.pem``, ``acl``, ``passwd`` (0600), generated
from the hub's security directory and store (the enrolled devices). The conf names the files
under ``--files-at`` (where they will be on the broker's machine; default DIR itself). Run it
again, install the files and send the broker SIGHUP after every ``devices add|revoke|set-group``
and before the CRL expires (``[security] crl_days``). Prints the ``[mqtt]`` settings the hub uses
to connect to that broker with its own identity.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List

from proto import atomic

FILES = ("ca.crt", "broker.crt", "broker.key", "crl.pem", "acl", "passwd")
SECRET = ("broker.key", "passwd", "acl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="hub.toml (default: embedded defaults)")
    p.add_argument("--out", required=True, help="directory to write mosquitto.conf and its files into")
    p.add_argument("--port", type=int, default=8883, help="the TLS listener's port (default 8883)")
    p.add_argument("--bind", default="", help="the TLS listener's address (default: every address)")
    p.add_argument("--files-at", default="", help="where DIR's files will be on the broker's machine, for the "
                                                  "paths in mosquitto.conf (default: DIR)")


def run(args: argparse.Namespace) -> int:
    from hub import config as hubconfig
    from hub.broker import packet_limit
    from hub.errors import ConfigError
    from hub.security import enrol, mosquitto
    from hub.store.open import open_store

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 1..65535")
    cfg = hubconfig.load(args.config)
    sec = enrol.Security(cfg)
    store = open_store(cfg)
    try:
        sec.write_broker_files(store)
        ident = sec.hub_identity()
    finally:
        store.close()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    at = Path(args.files_at) if args.files_at else out
    src = sec.listener_files()
    sources = {"ca.crt": src.cafile, "broker.crt": src.certfile, "broker.key": src.keyfile, "crl.pem": src.crlfile,
               "acl": src.aclfile, "passwd": src.passwdfile}
    for name in FILES:
        atomic.write_bytes(out / name, Path(sources[name]).read_bytes(), mode=0o600 if name in SECRET else 0o644)
        if name in SECRET:
            os.chmod(str(out / name), 0o600)
    files = mosquitto.ListenerFiles(cafile=str(at / "ca.crt"), certfile=str(at / "broker.crt"),
                                    keyfile=str(at / "broker.key"), crlfile=str(at / "crl.pem"),
                                    aclfile=str(at / "acl"), passwdfile=str(at / "passwd"))
    lines: List[str] = mosquitto.conf_lines(files, args.port, args.bind, cfg.security.mqtt_auth)
    lines += ["", "# what the hub's ingest needs (docs/hub.md, Scale-out); set persistence_location to the broker's",
              "# data directory (e.g. /var/lib/mosquitto/), else mosquitto.db goes to its working directory",
              "persistence true",
              "max_inflight_messages 1000", "max_queued_messages 100000", "persistent_client_expiration 7d",
              "# receipts and PUBACKs leave at once (no Nagle: else a device's delayed ACK holds them 40 ms)",
              "set_tcp_nodelay true",
              "# bounded before memory: a packet over [mqtt] max_payload_bytes + room for topic and headers is",
              "# refused on its header (docs/hub.md)",
              f"max_packet_size {packet_limit(cfg.mqtt.max_payload_bytes)}"]
    atomic.write_text(out / "mosquitto.conf", "\n".join(lines) + "\n")
    password = cfg.security.mqtt_auth != "certificate"
    print(f"wrote {out}/mosquitto.conf and {', '.join(FILES)} (broker.key, acl and passwd are 0600).")
    print("The hub connects to that broker with its own identity; in hub.toml:")
    print(f'[mqtt]\nhost = "<the broker\'s name, one of [security] broker_names>"\nport = {args.port}\ntls = true\n'
          f'ca_file = "{ident.ca_file}"\ncert_file = "{ident.cert_file}"\nkey_file = "{ident.key_file}"')
    if password:
        print(f'username = "{ident.username}"\npassword_file = "{sec.path(enrol.HUB_PASSWORD)}"')
    return 0
