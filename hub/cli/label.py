"""``kestrel-hub label FRAME_ID [LABEL | --clear | --unusable]``: set or clear a frame's label.

Two ways, the same rules (hub.labels: a label becomes a class folder name in the export):

* ``--hub URL --token-file FILE``: over the hub's JSON API, as the token's name (a labeller token or
  better); no access to the store's machine needed.
* ``--config hub.toml`` (or neither): on the hub's store directly, like ``export``; needs no running hub.
  The label is recorded as set by ``cli:<user>``.

Exit 2 for an invalid label, an unknown frame id or a refused token, 3 when the hub or the store cannot
be reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Optional

from hub.cli import apiclient
from hub.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="hub.toml, to label on the store directly (default: embedded "
                                                  "defaults; ignored with --hub)")
    apiclient.add_arguments(p, required=True)
    p.add_argument("frame_id", help="the frame's id (`kestrel-hub frames list` shows them)")
    p.add_argument("label", nargs="?", default=None,
                   help="class name: 1-64 of letters, digits, '_', '-', '.', starting with a letter or digit")
    p.add_argument("--clear", action="store_true", help="remove the frame's label")
    p.add_argument("--unusable", action="store_true", help="mark the frame unusable (left out of the export)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _wanted(args: argparse.Namespace) -> Optional[str]:
    from hub.labels import UNUSABLE

    if (args.label is not None) + args.clear + args.unusable != 1:
        raise ConfigError("give exactly one of LABEL, --clear or --unusable")
    return UNUSABLE if args.unusable else None if args.clear else args.label


def _say(frame_id: str, label: Optional[str], by: str) -> None:
    from hub.labels import UNUSABLE

    if label is None:
        print(f"frame {frame_id}: label cleared")
    elif label == UNUSABLE:
        print(f"frame {frame_id}: marked unusable (by {by})")
    else:
        print(f"frame {frame_id}: labelled {label!r} (by {by})")


def run(args: argparse.Namespace) -> int:
    wanted = _wanted(args)
    if args.hub:
        with apiclient.HubApi.from_args(args) as api:
            out = api.post("/api/labels", {"items": [{"frame_id": args.frame_id, "label": wanted}]})
        item = out["items"][0]
        if args.json:
            print(json.dumps({"frame_id": item["frame_id"], "label": item["label"], "previous": item["previous"],
                              "by": out["by"]}, sort_keys=True))
        else:
            _say(item["frame_id"], item["label"], out["by"])
        return 0
    from hub import config as hubconfig
    from hub.labels import set_label
    from hub.store.open import open_store

    cfg = hubconfig.load(args.config)
    store = open_store(cfg)
    try:
        by = f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in this environment
        by = "cli"
    try:
        rec = set_label(store, args.frame_id, wanted, by=by)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"frame_id": rec.frame_id, "device_id": rec.device_id, "label": rec.label,
                          "labelled_ms": rec.labelled_ms, "by": rec.labelled_by}, sort_keys=True))
    else:
        _say(rec.frame_id, rec.label, by)
    return 0
