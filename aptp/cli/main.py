"""The `aptp` command. Each subcommand lives in its own module and imports its subsystem lazily, so `aptp --help`
stays instant and `aptp serve` never imports training code."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import eval as eval_command
from . import export, generate, inspect, serve, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aptp", description="Prompt-routed pruning and serving of diffusion U-Nets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (inspect, train, generate, eval_command, export, serve):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:
        # Whoever read stdout has gone (`aptp inspect ... | head`): stop quietly, and point stdout at devnull so that
        # the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
