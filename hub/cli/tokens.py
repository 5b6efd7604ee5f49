"""``kestrel-hub tokens add NAME --role ROLE | list | revoke NAME``: the API tokens of the dashboard and API.

Works on the hub's store directly (like ``export``): whoever can read the hub's config and store may
manage its tokens. ``add`` prints the token once (the store keeps only its hash). Roles: hub.auth.ROLES.
"""

from __future__ import annotations

import argparse
import json
import time

from hub.auth import ROLES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="hub.toml (default: embedded defaults)")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    a = sub.add_parser("add", help="make a token and print it once")
    a.add_argument("name", help="who will use it (recorded with every label they set)")
    a.add_argument("--role", required=True, choices=sorted(ROLES), help="what it may do")
    a.add_argument("--json", action="store_true", help="print {name, role, token} as JSON")
    ls = sub.add_parser("list", help="list tokens (never their text)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    r = sub.add_parser("revoke", help="revoke a token (its sessions end at once)")
    r.add_argument("name")
    for sp in (a, ls, r):
        sp.add_argument("--config", default=argparse.SUPPRESS, help="hub.toml (default: embedded defaults)")


def _ms(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) if ms else "-"


def run(args: argparse.Namespace) -> int:
    from hub import auth
    from hub import config as hubconfig
    from hub.cli.fleet import print_table
    from hub.store.open import open_store

    cfg = hubconfig.load(args.config)
    store = open_store(cfg)
    try:
        if args.action == "add":
            token = auth.add_token(store, args.name, args.role)
            if args.json:
                print(json.dumps({"name": args.name, "role": args.role, "token": token}, sort_keys=True))
            else:
                print(token)
                print(f"(token {args.name!r}, role {args.role}: shown only now; the hub keeps its hash)")
        elif args.action == "list":
            tokens = auth.list_tokens(store)
            if args.json:
                print(json.dumps([{"name": t.name, "role": t.role, "created_ms": t.created_ms,
                                   "revoked_ms": t.revoked_ms} for t in tokens], sort_keys=True))
            else:
                print_table(["NAME", "ROLE", "CREATED (UTC)", "REVOKED (UTC)"],
                            [[t.name, t.role, _ms(t.created_ms), _ms(t.revoked_ms)] for t in tokens])
        else:
            auth.revoke_token(store, args.name)
            print(f"revoked token {args.name!r}")
    finally:
        store.close()
    return 0
