"""The ``vfmkit`` command: one entry point, one subcommand per module in ``vfmkit.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``register(subparsers)`` and sets ``func`` on its parser via set_defaults.
COMMANDS = [
    "quickstart",
    "data",
    "train",
    "eval",
    "teacher",
    "reinforce",
    "catlip",
    "subclone",
    "backfill",
    "tic",
    "export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfmkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"vfmkit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vfmkit.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vfmkit.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"vfmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
