"""The `rine` console script: one parser, one module per subcommand.

Each module `rine.cli.<name>` defines `register(subparsers)`, which adds its parser
and sets `func(args) -> int`. Modules are found from `COMMANDS`; a command whose
module is absent from this installation is simply not offered.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMANDS = ("detect", "batch", "eval", "calibrate", "extract", "train", "grid", "serve", "models", "push", "export", "provenance")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="rine",
        description="Detect synthetic (AI-generated) images with RINE (ECCV 2024).",
        epilog="Run `rine COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"rine {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():
        # Also after the command (`rine detect -v ...`), counted with those before it.
        command.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_after",
                             help="more log output (-vv for debug)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "verbose_after", 0)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        from .common import Terminated

        if isinstance(e, Terminated):
            print("terminated", file=sys.stderr)
            return 143
        print("interrupted", file=sys.stderr)
        return 130
