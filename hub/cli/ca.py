"""``kestrel-hub ca status|rotate|finish``: the fleet CA, and rotating it without locking devices out.

* ``status``: the CA, the fleet key, the CRL's expiry, whether a rotation runs and which enrolled
  devices still hold only a certificate of the previous CA;
* ``rotate``: the CA moves to ``previous/`` and a new one is created: the broker accepts client
  certificates of both and keeps its certificate of the previous one, new identity bundles carry
  both CA certificates. Re-enrol every device (``devices add NAME --force``) and install its new
  bundle;
* ``finish``: once no enrolled device depends on the previous CA (``--force`` to cut them off), the
  previous CA is retired and the broker gets a certificate of the new one.

Restart ``kestrel-hub serve`` after ``rotate`` and after ``finish``: the broker's trusted CAs and the
hub's own connection are set up at start (docs/security.md, *Rotating the CA*).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("status", "rotate", "finish"), help="what to do")
    p.add_argument("--config", "-c", default=None, help="hub.toml (default: embedded defaults)")
    p.add_argument("--force", action="store_true", help="finish: even while devices hold only a certificate "
                                                        "of the previous CA (they cannot connect afterwards)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if ms else "-"


def run(args: argparse.Namespace) -> int:
    from hub import config as hubconfig
    from hub.errors import SecurityError
    from hub.security import ca as camod
    from hub.security import enrol
    from hub.store.open import open_store

    cfg = hubconfig.load(args.config)
    if args.action == "rotate":
        if cfg.security.ca_cert_file:
            raise SecurityError("the CA is the operator's ([security] ca_cert_file): put its certificate and key "
                                f"in {cfg.security_dir / camod.PREVIOUS_DIR}/ (ca.crt, ca.key) and point "
                                "ca_cert_file/ca_key_file at the new CA (docs/security.md)")
        camod.begin_rotation(cfg.security_dir)
    sec = enrol.Security(cfg)
    store = open_store(cfg)
    try:
        stuck = enrol.devices_on_previous_ca(store, sec.ca) if sec.ca.previous is not None else []
        if args.action == "finish":
            if stuck and not args.force:
                raise SecurityError(f"{len(stuck)} enrolled device(s) hold only a certificate of the previous CA "
                                    f"({', '.join(stuck[:10])}{' ...' if len(stuck) > 10 else ''}): "
                                    "`kestrel-hub devices add NAME --force` each, or finish with --force")
            camod.finish_rotation(cfg.security_dir)
            sec = enrol.Security(cfg)
        if args.action != "status":
            enrol.apply(cfg, sec, store)
        out: Dict[str, Any] = {
            "ca": sec.ca.cert.subject.rfc4514_string(),
            "ca_expires": _when(int(sec.ca.cert.not_valid_after_utc.timestamp() * 1000)),
            "operator_ca": sec.ca.operator_supplied,
            "rotation": sec.ca.previous is not None,
            "previous_ca": sec.ca.previous.cert.subject.rfc4514_string() if sec.ca.previous is not None else "",
            "devices_on_previous_ca": stuck if args.action != "finish" else [],
            "crl_expires": _when(camod.crl_next_update_ms(sec.path(camod.CRL_FILE))),
            "fleet_key_id": sec.signer.key_id,
            "enrolled": len(enrol.enrolled(store)),
        }
    finally:
        store.close()
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    for k, v in out.items():
        print(f"{k}: {', '.join(v) if isinstance(v, list) else v}")
    if args.action in ("rotate", "finish"):
        print(f"{'rotation started' if args.action == 'rotate' else 'rotation finished'}: restart "
              "`kestrel-hub serve` now (its broker and its own connection load the CAs at start)")
    return 0
