"""`aptp inspect`: the architecture space, parameters and MACs of a U-Net, pipeline or expert folder."""

from __future__ import annotations

import argparse
import json
import sys

from .args import positive_int


def _inspect(args: argparse.Namespace) -> int:
    from aptp.formats.describe import describe, format_report
    from aptp.formats.expert import ExpertFileError

    try:
        report = describe(args.path, resolution=args.resolution, text_len=args.text_len, verify=args.verify)
    except (ExpertFileError, FileNotFoundError, ValueError) as e:
        print(f"aptp inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="architecture space, parameters and MACs of a U-Net or expert folder",
        description="Print the prunable units per block, parameter count, total and prunable MACs of a diffusers "
        "UNet2DConditionModel folder (config.json; weights optional) or of an expert folder.",
    )
    inspect.add_argument("path", help="U-Net folder (or pipeline folder with unet/), config.json, or expert folder")
    inspect.add_argument("--resolution", type=positive_int, help="U-Net input size (default: config sample_size)")
    inspect.add_argument("--text-len", type=positive_int, help="cross-attention key length (default: 77)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--verify", action="store_true", help="cross-check the MACs with torch's FlopCounterMode")
    inspect.set_defaults(handler=_inspect)
