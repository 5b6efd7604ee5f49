"""``kestrel-edge config-doc``: print the edge.toml reference."""

from __future__ import annotations

import argparse
import sys

from edge import config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    del args
    sys.stdout.write(config.describe())  # exactly docs/edge-config.md
    return 0
