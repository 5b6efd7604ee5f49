"""``kestrel-hub devices [list|add|revoke|set-group]``: the fleet's devices and their identities.

* ``devices`` / ``devices list``: every device as the running hub's Fleet service reports it (gRPC):
  reported and desired versions, whether its own desired state overrides its group's, the confidence
  threshold it reports in force, and its identity (enrolled in which group, revoked);
* ``devices add NAME [--group G] [--password] [--out DIR] [--force]``: issue its identity (a client
  certificate of the fleet CA and/or an MQTT password, a hub token of role device), record it as enrolled, write
  ``NAME.identity.tar`` (docs/security.md), regenerate the broker's ACL and reload it;
* ``devices revoke NAME``: revoke its certificates (CRL) and its hub token, remove it from the ACL and the
  password file, reload the broker: it cannot connect again;
* ``devices set-group NAME GROUP``: the group whose desired state it may read (ACL).

add/revoke/set-group work on the hub's store and security directory directly (``--config
hub.toml``, like ``label`` and ``export``), next to a running hub or without one. No secret is
ever printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, List

from hub.cli.fleet import _client, _common, _ms, _msg_dict, print_table
from hub.errors import SecurityError


def add_devices_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--group", default="", help="only devices of this group")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = sub.add_parser("list", help="list the fleet's devices (the default)")
    _common(ls, suppress=True)
    ls.add_argument("--group", default=argparse.SUPPRESS, help="only devices of this group")
    add = sub.add_parser("add", help="enrol a device: its identity bundle NAME.identity.tar")
    _config(add)
    add.add_argument("name", help="device id (its MQTT identity and topic segment)")
    add.add_argument("--group", default="default", help="its fleet group (default: default)")
    add.add_argument("--password", action="store_true",
                     help="also an MQTT username and password (always with [security] mqtt_auth = password/both)")
    add.add_argument("--out", default=".", help="directory for NAME.identity.tar (default: here)")
    add.add_argument("--force", action="store_true", help="issue a new identity for an enrolled device "
                                                          "(its old certificate is revoked)")
    add.add_argument("--mqtt", default="", help="HOST:PORT the device connects to (default: [security] "
                                                "advertise_mqtt, else the hub's broker)")
    add.add_argument("--hub-grpc", default="", help="HOST:PORT of the hub's registry for the device "
                                                    "(default: [grpc] advertise, else the hub's gRPC port)")
    rv = sub.add_parser("revoke", help="revoke a device's identity: it cannot connect again")
    _config(rv)
    rv.add_argument("name", help="device id")
    sg = sub.add_parser("set-group", help="move an enrolled device to another group (its ACL)")
    _config(sg)
    sg.add_argument("name", help="device id")
    sg.add_argument("new_group", metavar="GROUP", help="the new group")


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="hub.toml (default: embedded defaults)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a sentence")


def run_devices(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None) or "list"
    if action == "list":
        return _list(args)
    from hub import config as hubconfig
    from hub.security import enrol
    from hub.store.open import open_store

    cfg = hubconfig.load(args.config)
    sec = enrol.Security(cfg)
    store = open_store(cfg)
    try:
        if action == "add":
            mqtt = None
            if args.mqtt:
                host, _, port = args.mqtt.rpartition(":")
                if not host or not port.isdigit():
                    raise SecurityError(f"--mqtt {args.mqtt!r} must be HOST:PORT")
                mqtt = (host, int(port))
            e = enrol.add_device(cfg, sec, store, args.name, args.group, Path(args.out), password=args.password,
                                 force=args.force, mqtt=mqtt, hub_grpc=args.hub_grpc)
            out = {"device_id": args.name, "group": args.group, "bundle": str(e.bundle), "certificate": e.serial,
                   "password": e.password, "broker_reloaded": e.reloaded}
            text = (f"enrolled {args.name} in group {args.group}: {e.bundle} (certificate {e.serial}"
                    f"{', MQTT password' if e.password else ''}); {_reloaded(e.reloaded)}. The bundle holds "
                    "the device's private key and token: move it to the device and delete it here.")
        elif action == "revoke":
            rec, n, reloaded = enrol.revoke_device(cfg, sec, store, args.name)
            out = {"device_id": args.name, "certificates_revoked": n, "revoked_ms": rec.revoked_ms,
                   "broker_reloaded": reloaded}
            text = (f"revoked {args.name}: {n} certificate(s) in the CRL, removed from the ACL and the password "
                    f"file; {_reloaded(reloaded)}")
        else:
            rec, reloaded = enrol.set_group(cfg, sec, store, args.name, args.new_group)
            out = {"device_id": args.name, "group": args.new_group, "broker_reloaded": reloaded}
            text = (f"{args.name} now reads group {args.new_group}'s desired state; {_reloaded(reloaded)}. Set "
                    f"[device] group = \"{args.new_group}\" in its edge.toml too")
    finally:
        store.close()
    print(json.dumps(out, sort_keys=True) if args.json else text)
    return 0


def _reloaded(done: bool) -> str:
    return "the embedded broker reloaded" if done else \
        "no running embedded broker reloaded (an operator's broker: run `kestrel-hub broker-config` and reload it)"


def _identity(d: Any) -> str:
    if d.revoked_ms:
        return "revoked " + _ms(d.revoked_ms)[:10]
    if d.enrolled_ms:
        return f"enrolled ({d.enrolled_group})"
    return "-"


def _list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        devs = c.list_devices(args.group)
    if args.json:
        print(json.dumps([_msg_dict(d) for d in devs], sort_keys=True))
        return 0
    rows: List[List[object]] = []
    for d in devs:
        desired = f"{d.desired_model} v{d.desired_version}" if d.desired_model or d.desired_version else "-"
        if d.overrides_group:
            desired += " (device, overrides group)"
        reported = f"{d.reported.name} v{d.reported.version}" if d.reported.name else "-"
        prev = f"v{d.versions.previous.version}" if d.versions.previous.version else "-"
        threshold = f"{d.threshold:.2f}" if d.threshold else "-"
        rows.append([d.device_id, d.group, d.state, _ms(d.last_seen_ms), desired, reported, prev, threshold,
                     d.versions.update_state or "-", _identity(d), d.versions.reason or ""])
    print_table(["DEVICE", "GROUP", "STATE", "LAST SEEN (UTC)", "DESIRED", "REPORTED", "PREVIOUS", "THRESHOLD",
                 "UPDATE", "IDENTITY", "REASON"], rows)
    if not devs:
        print("(no devices have reported yet)")
    return 0
