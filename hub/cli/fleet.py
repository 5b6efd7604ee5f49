"""Fleet and registry CLI: ``kestrel-hub deploy|rollback|models`` (``devices`` is hub.cli.devices). The gRPC
client behind it (proto.hubclient.HubClient) is shared with kestrel-train and the demo.

Every call is TLS, verified with the fleet CA, and carries a token (deploy and rollback need the role
operator or admin, models and devices any person's role): found as proto.hubcreds says (``--token-file``,
``$KESTREL_HUB_TOKEN_FILE``, ``~/.config/kestrel/hub-token``), and on the hub's own machine, failing those,
the hub's first admin token ``<data_dir>/admin-token`` and its ``<security dir>/ca-bundle.crt`` from
``--config`` (default: the embedded defaults' ./kestrel-hub-data).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from proto import hubcreds
from proto.hubclient import DEFAULT_HUB, DEFAULT_TIMEOUT_S, HubClient, HubRefused

# ---- CLI ----

def _common(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """--hub, --timeout, --json and the credentials' flags; ``suppress``: no defaults (a sub-command's copy
    of its parent's flags, so a flag given before the sub-command keeps its value)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--hub", default=default(DEFAULT_HUB), help=f"hub gRPC address HOST:PORT (default {DEFAULT_HUB})")
    p.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT_S), help="deadline per call in seconds")
    p.add_argument("--json", action="store_true", default=default(False), help="print JSON instead of a table")
    p.add_argument("--token-file", default=default(""), help=f"file with a hub token (default: ${hubcreds.TOKEN_ENV}, "
                                                             f"~/.config/kestrel/{hubcreds.TOKEN_NAME}, else the "
                                                             "hub's <data_dir>/admin-token of --config)")
    p.add_argument("--ca-file", default=default(""), help=f"the fleet CA that signed the hub's certificate (default: "
                                                          f"${hubcreds.CA_ENV}, ~/.config/kestrel/{hubcreds.CA_NAME}, "
                                                          "else <security dir>/ca-bundle.crt of --config)")
    p.add_argument("--plaintext", action="store_true", default=default(False),
                   help="no TLS: the hub's [grpc] plain_port on this machine")
    p.add_argument("--config", "-c", default=default(None), help="the hub's hub.toml, to find its admin token and CA "
                                                                 "on the hub's machine (default: embedded defaults)")


def local_fallbacks(config: Any) -> Tuple[List[Path], List[Path]]:
    """(token files, CA files) of the hub config ``config`` (a path or None: the embedded defaults) that a
    command on the hub's own machine falls back to; nothing when the config cannot be read."""
    from hub import config as hubconfig
    from hub.auth import ADMIN_TOKEN_FILE
    from hub.errors import KestrelError
    from hub.security.ca import TRUST_FILE

    try:
        cfg = hubconfig.load(config)
    except KestrelError:
        if config:
            raise  # a config named on purpose must load
        return [], []
    return [cfg.data_dir / ADMIN_TOKEN_FILE], [cfg.security_dir / TRUST_FILE]


def credentials(args: argparse.Namespace) -> hubcreds.Credentials:
    tokens, cas = local_fallbacks(getattr(args, "config", None))
    return hubcreds.load(getattr(args, "token_file", ""), getattr(args, "ca_file", ""),
                         bool(getattr(args, "plaintext", False)), token_fallbacks=tokens, ca_fallbacks=cas)


def _client(args: argparse.Namespace) -> HubClient:
    return HubClient(args.hub, args.timeout, credentials(args))


def _ms(ms: int) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _msg_dict(msg: Any) -> Dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--device", default="", help="one device id")
    g.add_argument("--group", default="", help="a fleet group")


def add_deploy_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("model", help="model name")
    p.add_argument("version", nargs="?", type=int, default=0, help="version to run (default: the highest)")
    _target_args(p)


def _announce(args: argparse.Namespace, resp: Any, verb: str) -> int:
    if args.json:
        print(json.dumps(_msg_dict(resp), sort_keys=True))
        return 0
    d = resp.desired
    what = "rollback to the previous slot" if d.rollback else f"{d.model_name} v{d.version}"
    print(f"{verb}: {what} -> {resp.topic} (retained)")
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    if args.version < 0:
        raise HubRefused("INVALID_ARGUMENT", "version must be >= 0")
    with _client(args) as c:
        resp = c.deploy(args.model, args.version, args.device, args.group)
    return _announce(args, resp, "deployed")


def add_rollback_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    _target_args(p)


def run_rollback(args: argparse.Namespace) -> int:
    with _client(args) as c:
        resp = c.rollback(args.device, args.group)
    return _announce(args, resp, "rollback announced")


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("model", nargs="?", default="", help="only this model name")


def run_models(args: argparse.Namespace) -> int:
    with _client(args) as c:
        versions = c.list_models(args.model)
    if args.json:
        out = []
        for v in versions:
            d = _msg_dict(v)
            d["metrics"] = json.loads(v.metrics_json or "{}")
            d.pop("metrics_json", None)
            out.append(d)
        print(json.dumps(out, sort_keys=True))
        return 0
    rows = []
    for v in versions:
        metrics = json.loads(v.metrics_json or "{}")
        shown = ", ".join(f"{k}={_num(val)}" for k, val in sorted(metrics.items())
                          if isinstance(val, (int, float)) and not isinstance(val, bool))
        rows.append([v.model.name, v.model.version, v.size, v.bundle_sha256[:12], v.key_id, _ms(v.created_ms),
                     shown])
    print_table(["MODEL", "VERSION", "BYTES", "SHA256", "KEY", "PUSHED (UTC)", "METRICS"], rows)
    if not versions:
        print("(no models pushed yet)")
    return 0


def _num(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
