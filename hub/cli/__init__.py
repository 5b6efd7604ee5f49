"""``kestrel-hub``: one entry point, a module per subcommand (imported lazily, like edge.cli).

Each command module exposes ``add_<name>_arguments(parser)`` / ``run_<name>(args)`` (or the generic
``add_arguments`` / ``run``). Errors derived from KestrelError print one line and exit non-zero
(2 = bad input, 3 = something unreachable).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from hub import __version__
from proto.errors import DEBUG_HELP, run_command
from proto.hubcreds import quiet_grpc_core

# subcommand -> (module, help)
COMMANDS = {
    "serve": ("hub.server", "run the hub: MQTT ingest, gRPC registry + fleet, the dashboard, /metrics"),
    "export": ("hub.cli.export", "export labelled frames for training"),
    "label": ("hub.cli.label", "set or clear a frame's label (over the hub's API with --hub)"),
    "frames": ("hub.cli.frames", "list frames, show one, write its image (over the hub's API)"),
    "tokens": ("hub.cli.tokens", "add, list or revoke API tokens of the dashboard and API"),
    "devices": ("hub.cli.devices", "list the fleet's devices; add (enrol), revoke, set-group"),
    "broker-config": ("hub.cli.brokerconf", "write the Mosquitto configuration for an operator's broker"),
    "ca": ("hub.cli.ca", "the fleet CA: status, rotate, finish a rotation"),
    "fleet-key": ("hub.cli.fleetkey", "the key that signs desired state: status, rotate, finish a rotation"),
    "deploy": ("hub.cli.fleet", "deploy a model version to a device or group"),
    "rollback": ("hub.cli.fleet", "roll a device or group back to its previous model"),
    "models": ("hub.cli.fleet", "list the registry's model versions"),
    "loadgen": ("hub.cli.loadgen", "simulated devices sending frames to a hub; counts what it lost or stored twice"),
}


def _unavailable(name: str, exc: ImportError) -> int:
    print(f"kestrel-hub {name}: error: this command is not available in this install ({exc})",
          file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kestrel-hub", description="Kestrel hub: ingest, registry, fleet")
    p.add_argument("--version", action="version", version=f"kestrel-hub {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            sp.set_defaults(_module=None, _name=name, _import_error=exc)
            continue
        adder = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
        adder(sp)
        sp.set_defaults(_module=module, _name=name)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    quiet_grpc_core()  # before anything imports grpc
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args._module is None:
        return _unavailable(args._name, args._import_error)
    mod = importlib.import_module(args._module)
    runner = getattr(mod, f"run_{args._name.replace('-', '_')}", None) or mod.run
    return run_command(f"kestrel-hub {args._name}", lambda: runner(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
