"""``kestrel-edge install BUNDLE | rollback | status [--json]``: the update path from a shell.

The same checks as a hub-driven update (verify -> stage -> self-test -> switch), with the trusted
keys of the device's config only (``verify --trust`` checks a bundle against other keys; install
never does). With the daemon not running, the command switches the slot pointer itself and the
daemon starts the trial on its next start. With the daemon running (it holds
{data_dir}/update/daemon.lock), the command stages and self-tests, then asks the daemon through
{data_dir}/update/control.json to hot-swap (or roll back); the daemon polls that file every 0.5 s.
A rollback goes only to the previous slot whose model was committed on this device. See
docs/updates.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

from edge import config
from edge.updater import state as st
from edge.updater.control import daemon_running, request
from edge.updater.engine import NoRollbackTarget, NothingToDo, Updater
from edge.updater.report import status
from proto.bundle import read_bounded
from proto.errors import ArtifactError

WAIT_S = 30.0
# How long install and rollback wait for the update lock: the running daemon holds it for a moment around a
# hot swap or a commit; a download or self-test in progress holds it longer, and then the command says so.
CLI_LOCK_WAIT_S = 10.0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="edge.toml", help="the daemon's edge.toml (default: ./edge.toml)")


def _load(args: argparse.Namespace) -> Any:
    path = Path(args.config)
    if not path.exists() and args.config == "edge.toml":
        return config.load(None)
    return config.load(path)


def add_install_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("bundle", help="a signed .kbundle file (checked against [update] trust_dir)")
    p.add_argument("--new-model", action="store_true",
                   help="install a bundle of another model than the one installed (on purpose; its own "
                        "version floor still applies)")
    p.add_argument("--no-wait", action="store_true", help="with a running daemon: do not wait for the switch")


def add_rollback_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _wait_state(upd: Updater, states: List[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        upd.state.reload()
        if upd.state.state in states:
            return upd.state.state
        time.sleep(0.1)
    return upd.state.state


def run_install(args: argparse.Namespace) -> int:
    cfg = _load(args)
    upd = Updater.from_config(cfg)
    path = Path(args.bundle)
    data = read_bounded(path, int(cfg.update.max_bundle_bytes))  # size checked before reading
    try:
        with upd.locked(wait_s=CLI_LOCK_WAIT_S):
            running = daemon_running(upd.dir)  # under the update lock: the daemon takes it to boot
            slot = upd.prepare(data, source=f"file {path.name}", manual=True, new_model=args.new_model)
            del data
            if not running:
                upd.begin_trial(slot.name, baseline=None, boot_count=0)
                print(f"installed {slot.model_name} v{slot.version} in slot {slot.name}; the daemon runs its "
                      f"trial on its next start")
                return 0
            request(upd.dir, "switch", slot=slot.name)
    except NothingToDo as exc:
        print(f"nothing to do: {exc}")
        return 0
    print(f"staged {slot.model_name} v{slot.version} in slot {slot.name}; asked the running daemon to switch")
    if args.no_wait:
        return 0
    got = _wait_state(upd, [st.TRIAL, st.COMMITTED, st.ROLLED_BACK, st.FAILED], WAIT_S)
    print(f"update state: {got}")
    return 0 if got in (st.TRIAL, st.COMMITTED) else 1


def run_rollback(args: argparse.Namespace) -> int:
    cfg = _load(args)
    upd = Updater.from_config(cfg)
    reason = "manual rollback (kestrel-edge rollback)"
    with upd.locked(wait_s=CLI_LOCK_WAIT_S):
        running = daemon_running(upd.dir)
        try:
            target = upd.rollback_plan()  # the same rule the daemon applies (None: the factory model)
        except NoRollbackTarget as exc:
            raise ArtifactError(f"nothing to roll back to: {exc}") from exc
        if not running:
            slot = upd.rollback(reason, target=target, to_factory=target is None)
            if slot is None:
                print("rolled back to the factory model (model.path)")
            else:
                print(f"rolled back to {slot.model_name} v{slot.version} (slot {slot.name})")
            return 0
        before = upd.state.snapshot().get("updated_ms", 0)
        request(upd.dir, "rollback", reason=reason)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        upd.state.reload()
        snap = upd.state.snapshot()
        if snap.get("updated_ms", 0) != before and snap["state"] in (st.ROLLED_BACK, st.FAILED):
            print(f"{snap['state'].lower().replace('_', ' ')}: {snap.get('reason', '')}; installed: "
                  f"{status(upd)['installed']}")
            return 0 if snap["state"] == st.ROLLED_BACK else 2
        time.sleep(0.1)
    raise ArtifactError("the running daemon did not confirm the rollback within 30 s; check its log")


def run_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    s = status(Updater.from_config(cfg))
    if args.json:
        print(json.dumps(s, indent=1, sort_keys=True))
        return 0
    for label in ("installed", "previous"):
        v = s[label]
        desc = "-" if v is None else (f"{v['model_name']} v{v['version']} (slot {v['slot']}, "
                                      f"{v['model_sha256'][:12]})")
        print(f"{label:10s} {desc}")
    target = s["target"]
    print(f"{'state':10s} {s['state']}" + (f" (target v{target['version']})" if target.get("version") else "")
          + (f": {s['reason']}" if s["reason"] else ""))
    print(f"{'daemon':10s} {'running' if s['daemon_running'] else 'not running'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry (tests, and before edge.cli knows these commands)."""
    from proto.errors import DEBUG_HELP, run_command

    p = argparse.ArgumentParser(prog="kestrel-edge")
    sub = p.add_subparsers(dest="command")
    sub.required = True
    for name, adder in (("install", add_install_arguments), ("rollback", add_rollback_arguments),
                        ("status", add_status_arguments)):
        sp = sub.add_parser(name)
        sp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        adder(sp)
    args = p.parse_args(argv)
    runner = {"install": run_install, "rollback": run_rollback, "status": run_status}[args.command]
    return run_command(f"kestrel-edge {args.command}", lambda: runner(args), debug=args.debug)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
