"""``kestrel-hub frames list|show``: the frames in the hub's store, over its JSON API (no access to the
store's machine or SQL needed).

    kestrel-hub frames list --unlabelled --device cam-7 --below 0.5 --model-version 3 [--json]
    kestrel-hub frames show FRAME_ID [--image out.jpg] [--json]

``--hub URL`` (default $KESTREL_HUB_URL or http://127.0.0.1:8080) and ``--token-file FILE`` (a token of
any role; $KESTREL_HUB_TOKEN_FILE) as for ``label --hub``. Exit 2 for a refused request or an unknown
frame id, 3 when the hub cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List
from urllib.parse import quote

from hub.cli import apiclient

ORDERS = ("newest", "least_confident")
STATES = ("unlabelled", "labelled", "unusable", "any")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    ls = sub.add_parser("list", help="list frames, newest (or least confident) first")
    apiclient.add_arguments(ls)
    ls.add_argument("--unlabelled", action="store_true", help="only frames without a label (--state unlabelled)")
    ls.add_argument("--state", choices=STATES, default="any", help="label state (default any)")
    ls.add_argument("--device", default="", help="only this device")
    ls.add_argument("--group", default="", help="only devices of this group")
    ls.add_argument("--below", type=float, default=None, metavar="CONF", help="top-1 score under CONF")
    ls.add_argument("--min-score", type=float, default=None, metavar="CONF", help="top-1 score at least CONF")
    ls.add_argument("--model", default="", help="only frames of this model name")
    ls.add_argument("--model-version", type=int, default=None, metavar="V", help="only frames of this model version")
    ls.add_argument("--reason", default="", help="LOW_CONFIDENCE, LOW_MARGIN, HIGH_ENTROPY or TRIAL")
    ls.add_argument("--label", default="", help="only frames with this label")
    ls.add_argument("--order", choices=ORDERS, default="newest")
    ls.add_argument("--limit", type=int, default=50, help="at most this many frames (default 50; 0 = all)")
    ls.add_argument("--json", action="store_true", help="print JSON lines, one frame each")
    sh = sub.add_parser("show", help="one frame's details; --image writes its image")
    apiclient.add_arguments(sh)
    sh.add_argument("frame_id")
    sh.add_argument("--image", default="", metavar="FILE", help="write the frame's image (as the device sent it)")
    sh.add_argument("--json", action="store_true", help="print JSON")


def _ms(ms: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(ms) / 1000)) if ms else "-"


def _label(f: Dict[str, Any]) -> str:
    return "unusable" if f.get("unusable") else (f.get("label") or "-")


def run_list(args: argparse.Namespace) -> int:
    from hub.cli.fleet import print_table

    if args.limit < 0:
        raise apiclient.ApiRefused("--limit must be >= 0")
    params = {"state": "unlabelled" if args.unlabelled else args.state, "device": args.device, "group": args.group,
              "below": args.below, "min_score": args.min_score, "model": args.model, "version": args.model_version,
              "reason": args.reason, "label": args.label, "order": args.order}
    frames: List[Dict[str, Any]] = []
    with apiclient.HubApi.from_args(args) as api:
        after = ""
        while args.limit == 0 or len(frames) < args.limit:
            want = 500 if args.limit == 0 else min(500, args.limit - len(frames))
            page = api.get("/api/frames", {**params, "limit": want, "after": after})
            frames += page["frames"]
            after = page.get("next") or ""
            if not after:
                break
    if args.json:
        for f in frames:
            print(json.dumps(f, sort_keys=True))
        return 0
    rows = [[f["frame_id"], f["device_id"], _ms(f["capture_time_ms"]), f"{f['model_name']} v{f['model_version']}",
             f"{f['top_score']:.3f}", (f["top_k"][0].get("label") if f["top_k"] else "") or "-",
             ",".join(r.lower() for r in f["reasons"]), _label(f)] for f in frames]
    print_table(["FRAME", "DEVICE", "CAPTURED (UTC)", "MODEL", "TOP1", "GUESS", "REASONS", "LABEL"], rows)
    if not frames:
        print("(no frames match)")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from proto import atomic

    with apiclient.HubApi.from_args(args) as api:
        f = api.get(f"/api/frames/{quote(args.frame_id, safe='')}")
        if args.image:
            data = api.raw(f"/frames/{quote(args.frame_id, safe='')}/image")
            try:
                atomic.write_bytes(args.image, data)
            except OSError as exc:
                raise apiclient.ApiRefused(f"cannot write {args.image}: {exc.strerror}") from exc
    if args.json:
        print(json.dumps(f, sort_keys=True))
    else:
        top = ", ".join(f"{t.get('label') or t.get('index')} {float(t['score']):.3f}" for t in f["top_k"])
        for key, value in (("frame", f["frame_id"]), ("device", f"{f['device_id']} (group {f['group'] or '-'})"),
                           ("captured", f"{_ms(f['capture_time_ms'])} UTC"),
                           ("model", f"{f['model_name']} v{f['model_version']}"), ("top-k", top),
                           ("reasons", ", ".join(f["reasons"]) or "-"),
                           ("image", f"{f['width']}x{f['height']} {f['image_format']}"),
                           ("label", _label(f) + (f" (by {f['labelled_by']}, {_ms(f['labelled_ms'])} UTC)"
                                                  if f.get("labelled_ms") else ""))):
            print(f"{key:<9} {value}")
    if args.image and not args.json:
        print(f"image written to {args.image}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_list(args) if args.action == "list" else run_show(args)
