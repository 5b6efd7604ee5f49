"""``kestrel-hub label --config hub.toml FRAME_ID [LABEL | --clear]``: set or clear a frame's label.

Works on the hub's store directly (like ``export``), so it needs no running hub. The label rules are
hub.labels.validate_label's (a label becomes a class folder name in the export). Exit 2 for an
invalid label or an unknown frame id, 3 when the store cannot be reached.
"""

from __future__ import annotations

import argparse
import json

from hub.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="hub.toml (default: embedded defaults)")
    p.add_argument("frame_id", help="the frame's id (as shown by the dashboard / in the store)")
    p.add_argument("label", nargs="?", default=None,
                   help="class name: 1-64 of letters, digits, '_', '-', '.', starting with a letter or digit")
    p.add_argument("--clear", action="store_true", help="remove the frame's label")
    p.add_argument("--json", action="store_true", help="print the updated frame (without image) as JSON")


def run(args: argparse.Namespace) -> int:
    from hub import config as hubconfig
    from hub.labels import set_label
    from hub.store.open import open_store

    if args.clear == (args.label is not None):
        raise ConfigError("give either a LABEL or --clear")
    cfg = hubconfig.load(args.config)
    store = open_store(cfg)
    try:
        rec = set_label(store, args.frame_id, None if args.clear else args.label)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"frame_id": rec.frame_id, "device_id": rec.device_id, "label": rec.label,
                          "labelled_ms": rec.labelled_ms}, sort_keys=True))
    elif rec.label is None:
        print(f"frame {rec.frame_id}: label cleared")
    else:
        print(f"frame {rec.frame_id}: labelled {rec.label!r}")
    return 0
