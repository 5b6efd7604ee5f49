"""``kestrel-hub fleet-key status|rotate|finish``: the key that signs desired state, and rotating it.

* ``status``: the fleet key's id, and the next key's during a rotation;
* ``rotate``: create the next key. From now on identity bundles ship both public keys in
  ``fleet.pub``; give every device that file (``[update] fleet_keys``: re-enrol it, or copy the
  public file) before finishing;
* ``finish``: the next key signs from now on (restart ``kestrel-hub serve``: its renewer re-signs
  every retained desired state of ours with it at once). Devices that trust only the old key refuse
  the re-signed messages (``untrusted_key``) until they get the new ``fleet.pub``.

Only for the hub's own key (``[security] fleet_key_file`` empty); an operator's key is rotated by
pointing fleet_key_file at the new one (docs/security.md).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("status", "rotate", "finish"), help="what to do")
    p.add_argument("--config", "-c", default=None, help="hub.toml (default: embedded defaults)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from hub import config as hubconfig
    from hub.errors import SecurityError
    from hub.security import fleetkey

    cfg = hubconfig.load(args.config)
    if cfg.security.fleet_key_file and args.action != "status":
        raise SecurityError("the fleet key is the operator's ([security] fleet_key_file): rotate it by pointing "
                            "fleet_key_file at the new key once devices trust it (docs/security.md)")
    directory = cfg.security_dir
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if args.action == "rotate":
        fleetkey.rotate(directory)
    elif args.action == "finish":
        fleetkey.finish(directory)
    signer = fleetkey.FleetSigner(directory, cfg.security.fleet_key_file)
    ids = [json.loads(line)["key_id"] for line in signer.public_text.splitlines()]
    out = {"fleet_key_id": signer.key_id, "next_key_id": ids[1] if len(ids) > 1 else "",
           "fleet_pub": signer.public_text}
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"fleet key {signer.key_id}" + (f"; next key {out['next_key_id']} (rotation running)"
                                          if out["next_key_id"] else ""))
    if args.action == "rotate":
        print("identity bundles now carry both public keys: give every device the new fleet.pub, then "
              "`kestrel-hub fleet-key finish`")
    elif args.action == "finish":
        print("the new key signs from now on: restart `kestrel-hub serve` (it re-signs the retained desired state)")
    return 0
