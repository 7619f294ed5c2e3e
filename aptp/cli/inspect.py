"""`aptp inspect`: the architecture space, parameters and MACs of a U-Net, pipeline, expert, router or bundle
folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .args import positive_int


def inspect_report(path: str | Path, **options: Any) -> dict[str, Any]:
    """`aptp.formats.describe.describe`'s report (`options` are its), with a bundle's router settings added; for a
    router folder (a search's output), its codes' costs and settings."""
    from aptp.formats.describe import describe
    from router.model import describe_router, router_folder

    if (folder := router_folder(path)) is not None:
        return router_report(folder, **options)
    report = describe(path, **options)
    if report["kind"] == "bundle":
        report["router"] = describe_router(Path(report["path"]) / "router", report["num_codes"])
    return report


def router_report(
    folder: Path, resolution: int | None = None, text_len: int | None = None, verify: bool = False
) -> dict[str, Any]:
    """A router folder: what each code would cost as a dense network (the router's weights are read, its prompt
    encoder is not), its balancing offset, and the router's settings."""
    from aptp.formats.describe import describe_codes
    from pruning.space import ArchitectureSpace
    from router.model import Router, describe_router

    if verify:
        raise ValueError(f"{folder}: --verify counts a model's operators, and a router folder holds no U-Net")
    router = Router.load(folder)
    space = router.space
    if text_len is not None and text_len != space.text_len:
        space = ArchitectureSpace.from_dict({**space.to_dict(), "text_len": text_len})
    report = {"path": str(folder), "kind": "router"}
    report |= describe_codes(space, router.code_architectures(), resolution or router.resolution)
    for code, offset in zip(report["codes"], router.code_offsets.tolist(), strict=True):
        code["offset"] = offset
    report["router"] = describe_router(folder)
    return report


def _inspect(args: argparse.Namespace) -> int:
    from aptp.formats.describe import format_report
    from aptp.formats.expert import ExpertFileError
    from aptp.formats.files import ModelFileError

    try:
        report = inspect_report(args.path, resolution=args.resolution, text_len=args.text_len, verify=args.verify)
    except (ExpertFileError, ModelFileError, FileNotFoundError, ValueError) as e:
        print(f"aptp inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="architecture space, parameters and MACs of a U-Net, pipeline, expert, router or bundle folder",
        description="Print the prunable units per block, parameter count, total and prunable MACs of a diffusers "
        "UNet2DConditionModel folder (config.json; weights optional), a diffusers pipeline, teacher or expert "
        "folder, of every code of a router folder (a search's output) or of an APTP bundle folder (manifest.json), "
        "with the bundle's settings and router. Only the descriptions are read (and a router's small weights file, "
        "which holds its codes): no model weights are loaded or checksummed.",
    )
    inspect.add_argument(
        "path",
        help="U-Net folder (or pipeline folder with unet/), config.json, teacher, expert, router or bundle folder",
    )
    inspect.add_argument(
        "--resolution", type=positive_int, help="U-Net input size (default: config sample_size, or the bundle's)"
    )
    inspect.add_argument(
        "--text-len", type=positive_int, help="cross-attention key length (default: the model's own, else 77)"
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="cross-check the MACs with torch's FlopCounterMode (each code's, for a bundle)",
    )
    inspect.set_defaults(handler=_inspect)
