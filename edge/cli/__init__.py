"""``kestrel-edge``: one entry point, a module per subcommand (imported lazily).

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Errors derived from KestrelError print one line and exit non-zero (2 = bad input, 3 = transport).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import List, Optional

from edge import __version__
from proto.errors import DEBUG_HELP, run_command
from proto.hubcreds import quiet_grpc_core

# cryptography warns on every import under Python 3.8 (still the JetPack 4.6/5 Python); the
# device has no other Python, so the warning is noise that breaks "one clear line" errors.
warnings.filterwarnings("ignore", message=".*Python 3.8 is no longer supported.*")

# subcommand -> (module, help)
COMMANDS = {
    "run": ("edge.daemon", "run the daemon: camera -> model -> sampled frames over MQTT"),
    "verify": ("edge.cli.verify", "verify a bundle's signature and hashes"),
    "install": ("edge.cli.update", "install a bundle through the full update path"),
    "rollback": ("edge.cli.update", "return to the previous model slot"),
    "status": ("edge.cli.update", "show installed and previous models and the update state"),
    "config-doc": ("edge.cli.configdoc", "print the documented edge.toml reference"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kestrel-edge", description="Kestrel edge daemon and device tools")
    p.add_argument("--version", action="version", version=f"kestrel-edge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        mod = importlib.import_module(module)
        adder = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
        adder(sp)
        sp.set_defaults(_module=module, _name=name)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    quiet_grpc_core()  # before anything imports grpc
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mod = importlib.import_module(args._module)
    runner = getattr(mod, f"run_{args._name.replace('-', '_')}", None) or mod.run
    return run_command(f"kestrel-edge {args._name}", lambda: runner(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
