"""`aptp export`: a bundle from a teacher, a router and (optionally) a phase-2 run's experts."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _export(args: argparse.Namespace) -> int:
    import torch

    from aptp.formats.expert import is_expert_folder, load_expert
    from aptp.formats.files import ModelFileError
    from router.model import Router
    from training.export import export_bundle
    from training.models import load_training_teacher

    try:
        router = Router.load(args.router)
        teacher = load_training_teacher(args.teacher, router_encoder=router.config.encoder)
        experts, shares, phase2 = None, None, {}
        if args.experts is not None:
            run = pathlib.Path(args.experts)
            folders = [run / "experts" / str(code) for code in range(router.config.num_codes)]
            missing = [str(f) for f in folders if not is_expert_folder(f)]
            if missing:
                raise ModelFileError(missing[0], "expert folder missing or incomplete (is phase 2 finished?)")
            experts = [load_expert(folder)[0] for folder in folders]
            routing = run / "routing.json"
            if routing.is_file():
                codes = json.loads(routing.read_text())["codes"]
                shares = [codes.count(code) / len(codes) for code in range(router.config.num_codes)]
            settings = run / "config.json"
            if settings.is_file():  # the phase-2 run's step counts travel into the manifest
                config = json.loads(settings.read_text())
                phase2 = {"steps_per_code": config["expert"]["steps"], "shared_steps": config.get("shared_steps", 0)}
    except ModelFileError as e:
        print(f"aptp export: error: {e}", file=sys.stderr)
        return 2
    info = {"stage": "export", "teacher": args.teacher, "router": args.router, "experts": args.experts, **phase2}
    storage = getattr(torch, args.dtype)
    export_bundle(
        args.out, teacher.unet, teacher.spec, router, experts, shares, info, storage, **teacher.export_kwargs()
    )
    print(f"bundle written to {args.out}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a bundle from a teacher, a router and (optionally) fine-tuned experts",
        description="Write a bundle (manifest, router, one expert per code). With --experts, the experts come from a "
        "phase-2 run folder (experts/<code>/, training shares from routing.json); without, each code's expert is "
        "sliced from the teacher as is.",
    )
    export.add_argument("--teacher", required=True, help="teacher folder")
    export.add_argument("--router", required=True, help="router folder (e.g. runs/search-shapes/router)")
    export.add_argument("--experts", help="phase-2 run folder (e.g. runs/finetune-shapes)")
    export.add_argument("--out", required=True, help="bundle folder to write (replaced if it exists)")
    export.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="weight storage")
    export.set_defaults(handler=_export)
