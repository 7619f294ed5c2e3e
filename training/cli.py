"""The `aptp` command. Subcommands import their subsystem lazily so `aptp --help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _inspect(args: argparse.Namespace) -> int:
    from pruning.expert import ExpertFileError
    from pruning.report import describe, format_report

    try:
        report = describe(args.path, resolution=args.resolution, text_len=args.text_len, verify=args.verify)
    except (ExpertFileError, FileNotFoundError, ValueError) as e:
        print(f"aptp inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aptp", description="Prompt-routed pruning and serving of diffusion U-Nets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="architecture space, parameters and MACs of a U-Net or expert folder",
        description="Print the prunable units per block, parameter count, total and prunable MACs of a diffusers "
        "UNet2DConditionModel folder (config.json; weights optional) or of an expert folder.",
    )
    inspect.add_argument("path", help="U-Net folder (or pipeline folder with unet/), config.json, or expert folder")
    inspect.add_argument("--resolution", type=_positive_int, help="U-Net input size (default: config sample_size)")
    inspect.add_argument("--text-len", type=_positive_int, help="cross-attention key length (default: 77)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--verify", action="store_true", help="cross-check the MACs with torch's FlopCounterMode")
    inspect.set_defaults(handler=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
