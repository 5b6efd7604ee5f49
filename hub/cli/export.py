"""``kestrel-hub export --config hub.toml --out DIR [--since WHEN] [--min-per-class N] [--force]``.

Writes the labelled frames of the hub's store as a training data set (hub.export; docs/hub-registry.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from typing import Optional

from hub.errors import ConfigError


def parse_since(text: Optional[str]) -> Optional[int]:
    """Epoch milliseconds from an ISO date/time (UTC when no zone is given) or an integer of epoch ms."""
    if text is None or text == "":
        return None
    if text.isdigit():
        return int(text)
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--since {text!r}: use an ISO date/time like 2026-01-31 or 2026-01-31T12:00:00Z, "
                          "or epoch milliseconds") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return int(when.timestamp() * 1000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="hub.toml (default: embedded defaults)")
    p.add_argument("--out", required=True, help="data set folder to create (one sub-folder per class)")
    p.add_argument("--since", default=None,
                   help="only frames captured at/after this ISO date/time (UTC unless given) or epoch ms")
    p.add_argument("--min-per-class", type=int, default=0,
                   help="leave out classes with fewer labelled frames than this (listed in the manifest)")
    p.add_argument("--force", action="store_true", help="replace an existing previous export at --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from hub import config as hubconfig
    from hub.export import export_dataset
    from hub.store.open import open_store

    since = parse_since(args.since)
    cfg = hubconfig.load(args.config)
    store = open_store(cfg)
    try:
        res = export_dataset(store, args.out, since_ms=since, min_per_class=args.min_per_class,
                             force=args.force)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"out": str(res.out_dir), "frames": res.frames, "classes": res.classes,
                          "skipped_classes": res.skipped_classes}, sort_keys=True))
        return 0
    print(f"exported {res.frames} frames in {len(res.classes)} classes to {res.out_dir}")
    for label, n in res.classes.items():
        print(f"  {label:<24} {n}")
    for label, n in res.skipped_classes.items():
        print(f"  {label:<24} {n}  (left out: fewer than --min-per-class={args.min_per_class})")
    return 0
