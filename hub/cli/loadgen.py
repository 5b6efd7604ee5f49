"""``kestrel-hub loadgen``: N simulated devices sending F frames/s each to a hub's broker for a while, then a summary:
what was sent, resent, receipted, how fast, which hub worker committed what, and (with a store) what the store
holds of the run: lost, stored twice (hub/loadgen/, docs/hub.md *Load generator*).

Where to send: ``--host``/``--port`` (with ``--tls``, ``--ca-file``, ``--cert-file``/``--key-file``,
``--username``/``--password-file`` as the broker asks), or ``--config hub.toml`` (the broker its running hub
uses, from ``<data_dir>/hub.json``, and its store for the count), or ``--identities DIR``: the
``NAME.identity.tar`` bundles of ``kestrel-hub devices add`` (one enrolled identity per simulated device, as
the per-device ACL of a secure broker wants; their broker address unless ``--host`` is given).

Exit status: 0 every frame receipted (and, with a store, stored exactly once); 1 frames not receipted, refused,
lost or stored twice; 2 bad arguments or a broker refusing the devices; 3 the broker or store unreachable.
The first Ctrl-C stops publishing and still drains and reports; a second one stops at once (exit 130).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from hub.errors import ConfigError
from hub.loadgen.device import Credentials, DeviceSettings
from hub.loadgen.runner import Plan, Run, new_run_id

SINCE_MARGIN_MS = 60_000  # the store count looks at frames captured from this long before the run started


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where")
    g.add_argument("--config", "-c", default=None, help="hub.toml: its running hub's broker and its store")
    g.add_argument("--host", default="", help="broker host (default: from --config or --identities, else 127.0.0.1)")
    g.add_argument("--port", type=int, default=0, help="broker port (default: 1883, 8883 with --tls)")
    g.add_argument("--tls", action="store_true", help="connect with TLS")
    g.add_argument("--ca-file", default="", help="CA bundle for TLS (implies --tls)")
    g.add_argument("--cert-file", default="", help="client certificate, one for every simulated device")
    g.add_argument("--key-file", default="", help="its private key")
    g.add_argument("--username", default="", help="MQTT username")
    g.add_argument("--password-file", default="", help="file holding the MQTT password")
    g.add_argument("--identities", default="", help="folder of NAME.identity.tar (kestrel-hub devices add): one "
                                                     "enrolled identity per simulated device")
    g.add_argument("--store", default="", help="store URL to count the run's frames in (default: --config's)")
    w = p.add_argument_group("load")
    w.add_argument("--devices", type=int, default=10, help="simulated devices (default 10)")
    w.add_argument("--fps", type=float, default=1.0, help="frames per second per device (default 1)")
    w.add_argument("--duration", type=float, default=60.0, help="seconds of publishing (default 60)")
    w.add_argument("--frame-bytes", type=int, default=30000, help="JPEG size of each frame (default 30000)")
    w.add_argument("--device-prefix", default="loadgen", help="device ids PREFIX-0000.. (without --identities)")
    w.add_argument("--run-id", default="", help="frame ids are RUN-DEVICE-SEQ (default: a new random run id)")
    d = p.add_argument_group("device behaviour")
    d.add_argument("--no-receipts", action="store_true", help="a frame is done on the broker's PUBACK (hubs "
                                                               "with [mqtt] receipts = false)")
    d.add_argument("--receipt-timeout", type=float, default=60.0, help="resend a frame no receipt named this "
                                                                       "long after its PUBACK (default 60 s)")
    d.add_argument("--receipt-timeout-max", type=float, default=900.0, help="longest wait between resends")
    d.add_argument("--reconnect-min", type=float, default=0.2, help="first reconnect wait (doubling)")
    d.add_argument("--reconnect-max", type=float, default=10.0, help="longest reconnect wait")
    d.add_argument("--drain", type=float, default=60.0, help="after publishing, wait this long at most for "
                                                             "the last receipts (default 60 s)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")
    o.add_argument("--records", default="", help="write one CSV row per frame here (publish time, sends, "
                                                 "committed_ms, receipt time, hub)")
    o.add_argument("--progress", type=float, default=10.0, help="a progress line on stderr this often (0: none)")


def _hub_target(config: Optional[str]) -> Tuple[Dict[str, Any], str]:
    """(broker settings, store URL) of a hub config: the running hub's hub.json when there is one."""
    from hub import config as hubconfig
    cfg = hubconfig.load(config)
    target: Dict[str, Any] = {"host": cfg.mqtt.host, "port": cfg.mqtt.port, "tls": cfg.mqtt.tls,
                              "ca_file": cfg.mqtt.ca_file}
    info = cfg.data_dir / "hub.json"
    if info.exists():
        try:
            data = json.loads(info.read_text())
            target = {"host": data["mqtt_host"], "port": int(data["mqtt_port"]), "tls": bool(data.get("mqtt_tls")),
                      "ca_file": str(data.get("mqtt_ca_file") or "")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the hub's {info}: {exc}") from exc
    elif cfg.mqtt.embedded:
        raise ConfigError(f"{info} does not exist: start the hub (kestrel-hub serve) first, or give --host")
    return target, cfg.store_url


@contextlib.contextmanager
def _identities(folder: str, n: int) -> Iterator[Tuple[List[str], List[Credentials], Dict[str, Any]]]:
    """The first ``n`` identity bundles of ``folder``: device ids, their credentials (members written to a
    private temp folder, removed afterwards) and the broker address the first one names."""
    from hub.security.identity import read_bundle
    bundles = sorted(Path(folder).expanduser().glob("*.identity.tar"))
    if len(bundles) < n:
        raise ConfigError(f"--identities {folder}: {len(bundles)} identity bundles for --devices {n}; enrol more "
                          "with `kestrel-hub devices add NAME --out DIR`")
    ids: List[str] = []
    creds: List[Credentials] = []
    where: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kestrel-loadgen-") as tmp:
        for b in bundles[:n]:
            try:
                members = read_bundle(b)
                ident = json.loads(members["identity.json"])
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(f"{b}: not an identity bundle of kestrel-hub devices add: {exc}") from exc
            dev = str(ident["device_id"])
            files = {}
            for member in ("ca.crt", "device.crt", "device.key"):
                if member in members:
                    path = Path(tmp) / f"{dev}.{member}"
                    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(members[member])
                    files[member] = str(path)
            password = members.get("mqtt-password", b"").decode().strip()
            ids.append(dev)
            creds.append(Credentials(tls=True, ca_file=files.get("ca.crt", ""), cert_file=files.get("device.crt", ""),
                                     key_file=files.get("device.key", ""), username=dev if password else "",
                                     password=password))
            where = where or {"host": ident.get("mqtt_host", ""), "port": int(ident.get("mqtt_port", 0))}
        yield ids, creds, where


def run(args: argparse.Namespace) -> int:
    target: Dict[str, Any] = {}
    store_url = args.store
    if args.config is not None:
        target, hub_store = _hub_target(args.config)
        store_url = store_url or hub_store
    run_id = args.run_id or new_run_id()
    with contextlib.ExitStack() as stack:
        if args.identities:
            devices, creds, where = stack.enter_context(_identities(args.identities, args.devices))
            target = {**where, **{k: v for k, v in target.items() if k in ("host", "port") and v}}
        else:
            devices = [f"{args.device_prefix}-{i:04d}" for i in range(args.devices)]
            password = ""
            if args.password_file:
                try:
                    password = Path(args.password_file).read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"--password-file {args.password_file}: {exc.strerror}") from exc
            tls = args.tls or bool(args.ca_file) or bool(target.get("tls"))
            creds = [Credentials(tls=tls, ca_file=args.ca_file or target.get("ca_file", ""), cert_file=args.cert_file,
                                 key_file=args.key_file, username=args.username, password=password)]
        tls = creds[0].tls
        host = args.host or target.get("host") or "127.0.0.1"
        port = args.port or int(target.get("port") or 0) or (8883 if tls else 1883)
        settings = DeviceSettings(host=host, port=port, run_id=run_id, receipts=not args.no_receipts,
                                  receipt_timeout_s=args.receipt_timeout,
                                  receipt_timeout_max_s=args.receipt_timeout_max,
                                  reconnect_min_s=args.reconnect_min, reconnect_max_s=args.reconnect_max)
        plan = Plan(devices=devices, fps=args.fps, duration_s=args.duration, frame_bytes=args.frame_bytes,
                    settings=settings, credentials=creds, drain_s=args.drain, progress_s=args.progress)
        lg = Run(plan)
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:  # the first Ctrl-C: stop publishing, drain, report
            lg.stop()
            signal.signal(signal.SIGINT, previous)  # the second one stops at once
        signal.signal(signal.SIGINT, on_sigint)
        try:
            summary = lg.run()
        finally:
            signal.signal(signal.SIGINT, previous)
    if args.records:
        lg.write_records(Path(args.records))
    if store_url:
        from hub.loadgen import storecheck
        from hub.store.open import open_store
        store = open_store(store_url)
        try:
            summary["store"] = storecheck.count(store, run_id, lg.sent_by_device(),
                                                int(lg.started * 1000) - SINCE_MARGIN_MS)
        finally:
            store.close()
    print(json.dumps(summary, indent=1) if args.json else "\n".join(describe(summary)))
    st = summary.get("store", {})
    bad = summary["not_receipted"] or summary["refused"] or st.get("lost") or st.get("stored_twice")
    return 1 if bad else 0


def describe(s: Dict[str, Any]) -> List[str]:
    c, r = s["publish_to_committed_ms"], s["publish_to_receipt_ms"]
    lines = [f"kestrel-hub loadgen: run {s['run_id']}: {s['devices']} devices x {s['fps_per_device']:g} fps for "
             f"{s['duration_s']:g} s, {s['frame_bytes']} B frames, broker {s['broker']}",
             f"sent {s['sent']} ({s['publish_fps']:g}/s), resent {s['resent']}, done {s['done']} (refused "
             f"{s['refused']}), not receipted {s['not_receipted']}",
             f"publish -> committed (hub clock): p50 {c['p50']:g} ms, p95 {c['p95']:g} ms, max {c['max']:g} ms; "
             f"publish -> receipt: p95 {r['p95']:g} ms",
             "receipts by hub: " + (", ".join(f"{k} {v}" for k, v in s["receipts_by_hub"].items()) or "-"),
             f"reconnects {s['reconnects']}, resend requests {s['resend_requests']}, publisher behind schedule at "
             f"most {s['behind_max_ms']:g} ms, drain {s['drain_s']:g} s"]
    st = s.get("store")
    if st:
        lines.append(f"store: {st['stored']} of {st['published']} stored, {st['lost']} lost, {st['stored_twice']} "
                     f"stored twice" + (f" (lost e.g. {', '.join(st['lost_sample'][:3])})" if st["lost"] else ""))
    return lines


if __name__ == "__main__":  # pragma: no cover
    from hub.cli import main
    sys.exit(main(["loadgen", *sys.argv[1:]]))
