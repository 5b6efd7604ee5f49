"""``kestrel-edge verify BUNDLE``: check a bundle's container, signature, hashes and expiry.

Trusted keys come from ``--trust`` (a ``.pub`` file or a directory of them) or else the config's
trust directory. Exit 0 and a summary when the bundle is valid; otherwise one line
``bundle refused: <reason>: <detail>`` and exit 2 (see docs/bundle-format.md for the reasons).
Checked in this order, so the first problem is the one reported: the bundle file exists, the config
loads, the trusted keys load, the bundle verifies. With ``--json`` every failure also prints
``{"ok": false, "reason": ..., "error": ...}`` on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict

from edge import config as configmod
from proto import bundle as bundlemod
from proto import keys as keymod
from proto.errors import BundleError, KestrelError, KeyFileError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="the .kbundle file to verify")
    parser.add_argument("--trust", type=Path, default=None,
                        help="trusted public key file (.pub) or directory of them "
                             "(default: the config's update.trust_dir)")
    parser.add_argument("--config", type=Path, default=None,
                        help="edge.toml (update.trust_dir, update.max_bundle_bytes, update.clock_slack_s); "
                             "default: the built-in defaults")
    parser.add_argument("--installed-version", type=int, default=0, metavar="N",
                        help="also refuse the bundle unless its version is above N (default 0: no check)")
    parser.add_argument("--json", action="store_true", help="print the verdict as one JSON object")


def _check_exists(path: Path) -> None:
    """The bundle is checked before anything else: a missing file is the first thing to say."""
    if not path.exists():
        raise BundleError(f"bundle refused: not_a_bundle: {path} does not exist", reason="not_a_bundle")
    if path.is_dir():
        raise BundleError(f"bundle refused: not_a_bundle: {path} is a directory, not a .kbundle file",
                          reason="not_a_bundle")


def _trusted_keys(args: argparse.Namespace, cfg: configmod.EdgeConfig) -> Dict[str, Any]:
    if args.trust is not None:
        return keymod.load_public_keys(args.trust)
    try:
        return keymod.load_public_keys(cfg.trust_dir)
    except KestrelError as exc:
        where = f"--config {args.config}" if args.config is not None else "the built-in defaults"
        raise KeyFileError(f"{exc} (the trust directory from {where}; pass --trust KEY.pub or "
                           "--config edge.toml)") from exc


def run(args: argparse.Namespace) -> int:
    try:
        return _verify(args)
    except KestrelError as exc:
        if args.json:
            print(json.dumps({"ok": False, "reason": getattr(exc, "reason", "") or type(exc).__name__,
                              "error": str(exc)}, sort_keys=True))
        raise


def _verify(args: argparse.Namespace) -> int:
    _check_exists(args.bundle)
    cfg = configmod.load(args.config)
    trusted = _trusted_keys(args, cfg)
    limit = int(cfg.update.max_bundle_bytes)
    slack = float(cfg.update.clock_slack_s)
    data = bundlemod.read_bounded(args.bundle, limit)
    now = time.time()
    vb = bundlemod.verify_bundle(data, trusted, installed_version=args.installed_version, now=now,
                                 clock_slack_s=slack, max_bundle_bytes=limit)
    m = vb.manifest
    if args.json:
        print(json.dumps({
            "ok": True, "model_name": m.model_name, "version": m.version, "key_id": vb.key_id,
            "created": m.created, "expires": m.expires, "expired_within_slack": now > m.expires,
            "bundle_sha256": vb.bundle_sha256,
            "files": {k: {"sha256": v.sha256, "length": v.length} for k, v in sorted(m.files.items())},
            "labels": m.labels, "input": m.input_spec.to_dict(), "self_test_cases": len(m.self_test.cases),
        }, sort_keys=True))
    else:
        exp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(m.expires))
        print(f"bundle OK: {m.model_name} v{m.version}, signed by key {vb.key_id}, expires {exp}, "
              f"sha256 {vb.bundle_sha256}")
        if now > m.expires:
            print(f"warning: expired, accepted only within the clock slack ({slack:.0f} s); "
                  "ask for a freshly signed bundle")
    return 0
