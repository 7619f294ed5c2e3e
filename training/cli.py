"""The `aptp` command. Subcommands import their subsystem lazily so `aptp --help` stays instant."""

from __future__ import annotations

import argparse
import json
import pathlib
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


def _train_evaluator(args: argparse.Namespace) -> int:
    from training.evaluator import train_evaluator

    accuracy = train_evaluator(args.out, steps=args.steps, train_images=args.images, seed=args.seed, device=args.device)
    print(json.dumps({"held_out_accuracy": accuracy}, indent=1))
    return 0


# `aptp train JOB --config FILE`: job -> (module, config class, run function, help, path of its step count).
TRAIN_JOBS = {
    "teacher": (
        "training.teacher",
        "TeacherConfig",
        "train_teacher",
        "train the embedded domain's teacher U-Net",
        "optim.steps",
    ),
    "search": ("training.search", "SearchConfig", "run_search", "APTP phase 1: router and architecture codes", "steps"),
    "finetune": (
        "training.finetune",
        "FinetuneConfig",
        "run_finetune",
        "APTP phase 2: route, fine-tune one expert per code, export the bundle",
        "expert.steps",
    ),
    "baseline": (
        "training.baseline",
        "BaselineConfig",
        "run_baseline",
        "static L1-norm pruning baseline, fine-tuned and exported as a one-code bundle",
        "expert.steps",
    ),
}
PATH_OVERRIDES = ("out", "export", "teacher", "router")


def _train_job(args: argparse.Namespace) -> int:
    import importlib

    import yaml

    from pruning.files import ModelFileError
    from training.config import ConfigError, load_config

    module_name, config_name, run_name, _, steps_path = TRAIN_JOBS[args.job]
    module = importlib.import_module(module_name)
    overrides = {k: getattr(args, k) for k in PATH_OVERRIDES if getattr(args, k, None) is not None}
    if args.steps is not None:
        overrides[steps_path] = args.steps
    for assignment in args.set or []:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            print(f"aptp train {args.job}: error: --set expects KEY=VALUE (got {assignment!r})", file=sys.stderr)
            return 2
        overrides[key.strip()] = yaml.safe_load(text)  # YAML typing: 1 -> int, false -> bool, [1, 2] -> list
    try:
        config = load_config(args.config, getattr(module, config_name), overrides)
        getattr(module, run_name)(config)
    except (ConfigError, ModelFileError) as e:
        print(f"aptp train {args.job}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from pruning.expert import is_expert_folder, load_expert
    from pruning.files import ModelFileError
    from pruning.teacher import load_teacher, load_text_adapter
    from router.model import Router
    from training.export import export_bundle

    try:
        teacher, spec = load_teacher(args.teacher)
        adapter = load_text_adapter(args.teacher)
        router = Router.load(args.router)
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
    export_bundle(args.out, teacher, spec, router, experts, shares, info, storage_dtype=storage, text_adapter=adapter)
    print(f"bundle written to {args.out}")
    return 0


def _load_pipeline(command: str, path: str, device: str):
    """A bundle or teacher folder, or None after printing why it cannot be loaded."""
    from pruning.files import ModelFileError
    from router.pipeline import RoutedPipeline

    try:
        return RoutedPipeline.load(path, device=device)
    except ModelFileError as e:
        print(f"aptp {command}: error: {e}", file=sys.stderr)
        return None


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    pipeline = _load_pipeline("generate", args.bundle, args.device)
    if pipeline is None:
        return 2
    seeds = [args.seed + i for i in range(args.num_images)]
    result = pipeline([args.prompt] * args.num_images, seeds, steps=args.steps, guidance_scale=args.guidance)
    images = result.images
    row = images.permute(2, 0, 3, 1).reshape(images.shape[2], -1, 3).numpy()  # (H, N * W, 3)
    picture = Image.fromarray(row)
    picture = picture.resize((picture.width * args.scale, picture.height * args.scale), Image.Resampling.NEAREST)
    picture.save(args.out)
    code = result.codes[0]
    macs = pipeline.codes[code].macs
    print(
        f"wrote {args.out} ({args.num_images} image(s), seeds {seeds[0]}..{seeds[-1]}; code {code}, "
        f"{macs / 1e9:.3f} GMACs per U-Net call = {macs / pipeline.teacher_macs:.2f} x teacher)"
    )
    return 0


def _report_name(args: argparse.Namespace, bundle: str) -> str:
    """An evaluated bundle's report name: --name, else the bundle folder's name."""
    return args.name or pathlib.Path(bundle).name


def _eval(args: argparse.Namespace) -> int:
    from training.evaluate import read_report, run_comparison, run_eval
    from training.evaluator import DomainEvaluator

    earlier = []
    for path in args.compare or []:  # read first: a bad file fails before any sampling
        try:
            earlier.append(read_report(path))
        except ValueError as e:
            print(f"aptp eval: error: {e}", file=sys.stderr)
            return 2
    bundles = args.bundle or ([] if earlier else ["bundles/shapes/teacher"])
    names = [r["name"] for r in earlier] + [_report_name(args, bundle) for bundle in bundles]
    if args.reference is not None and args.reference not in names:
        print(
            f"aptp eval: error: --reference {args.reference!r} is none of the compared models {names}", file=sys.stderr
        )
        return 2
    if args.name and len(bundles) > 1:
        print("aptp eval: error: --name names one bundle's report; with several bundles, reports take the folder names")
        return 2
    try:
        evaluator = DomainEvaluator.load(args.evaluator) if bundles else None
    except ValueError as e:
        print(f"aptp eval: error: {e}", file=sys.stderr)
        return 2
    pipelines = []
    for bundle in bundles:  # load all first: a bad path fails before any hour of sampling
        pipeline = _load_pipeline("eval", bundle, args.device)
        if pipeline is None:
            return 2
        pipelines.append(pipeline)
    reports = []
    for bundle, pipeline in zip(bundles, pipelines, strict=True):
        name = _report_name(args, bundle)
        extra = {"bundle": str(bundle), "steps": args.steps or pipeline.default_steps}
        report = run_eval(
            pipeline,
            evaluator,
            args.out,
            name,
            args.num_prompts,
            args.num_heldout,
            args.seed,
            extra,
            args.steps,
            args.guidance,
        )
        for result in report["results"]:
            summary = {k: v for k, v in result.items() if k not in ("routing", "alignment_per_prompt")}
            print(json.dumps(summary | {"name": name}))
        print(f"wrote {args.out}/{name}.json, .md and _samples.png")
        reports.append(report)
    reports = earlier + reports
    if len(reports) > 1:
        path = run_comparison(reports, args.out, args.compare_name, args.reference)
        print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {value}")
    return value


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

    train = commands.add_parser("train", help="training jobs").add_subparsers(dest="job", required=True, metavar="JOB")
    evaluator = train.add_parser("evaluator", help="train the shapes domain's evaluator (classifier)")
    evaluator.add_argument("--out", default="bundles/shapes/evaluator", help="output folder")
    evaluator.add_argument("--steps", type=_positive_int, default=3000)
    evaluator.add_argument("--images", type=_positive_int, default=60_000, help="generated training images")
    evaluator.add_argument("--seed", type=int, default=1000)
    evaluator.add_argument("--device", default="cpu")
    evaluator.set_defaults(handler=_train_evaluator)

    for job, (_, _, _, help_text, _) in TRAIN_JOBS.items():
        parser_job = train.add_parser(job, help=f"{help_text} (resumes a killed run)")
        parser_job.add_argument("--config", required=True, help=f"YAML config, e.g. configs/shapes/{job}.yaml")
        for field in PATH_OVERRIDES:
            parser_job.add_argument(f"--{field}", help=f"{field} path (overrides the config)")
        parser_job.add_argument("--steps", type=_positive_int, help="training steps (overrides the config)")
        parser_job.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override any config field, dotted for nested ones (e.g. --set num_codes=1 --set use_ot=false)",
        )
        parser_job.set_defaults(handler=_train_job)

    generate = commands.add_parser("generate", help="generate images for one prompt")
    generate.add_argument("prompt")
    generate.add_argument("--bundle", default="bundles/shapes/teacher", help="bundle or teacher folder")
    generate.add_argument("--out", required=True, help="PNG file (one row of images)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=_positive_int, help="sampling steps (default: the model's)")
    generate.add_argument("--guidance", type=_non_negative_float, help="guidance scale (default: the model's)")
    generate.add_argument("--num-images", type=_positive_int, default=1)
    generate.add_argument("--scale", type=_positive_int, default=4, help="nearest-neighbour upscaling for viewing")
    generate.add_argument("--device", default="cpu")
    generate.set_defaults(handler=_generate)

    evaluate = commands.add_parser("eval", help="prompt alignment, domain FID and CMMD on the shapes domain")
    evaluate.add_argument(
        "--bundle",
        action="append",
        help="bundle or teacher folder (default bundles/shapes/teacher); repeat it to compare several in one table",
    )
    evaluate.add_argument(
        "--compare",
        nargs="+",
        metavar="REPORT",
        help="reports (JSON) of earlier `aptp eval` runs to put in the comparison table before the --bundle rows; "
        "with no --bundle, only the table is written (no sampling)",
    )
    evaluate.add_argument("--compare-name", default="compare", help="file name of the comparison table")
    evaluate.add_argument(
        "--reference",
        metavar="NAME",
        help="report name to compare every other model's alignment with, prompt by prompt (paired differences "
        "with 95%% bootstrap intervals, below the table)",
    )
    evaluate.add_argument("--evaluator", default="bundles/shapes/evaluator")
    evaluate.add_argument("--out", default="benchmarks/results")
    evaluate.add_argument("--name", help="report name (default: the bundle folder's name)")
    evaluate.add_argument("--num-prompts", type=_positive_int, default=1000, help="held-out prompts (test split)")
    evaluate.add_argument("--num-heldout", type=_positive_int, default=400, help="prompts with unseen combinations")
    evaluate.add_argument("--seed", type=int, default=7)
    evaluate.add_argument("--steps", type=_positive_int, help="sampling steps (default: the model's, 25)")
    evaluate.add_argument("--guidance", type=_non_negative_float, help="guidance scale (default: the model's)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(handler=_eval)

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

    serve = commands.add_parser(
        "serve",
        help="serve a bundle over HTTP",
        description="Serve a bundle (or a teacher folder as one code) with FastAPI + uvicorn. Every setting is read "
        "from APTP_* environment variables (see server/settings.py); these options override them.",
    )
    serve.add_argument("--bundle", help="bundle or teacher folder (APTP_BUNDLE)")
    serve.add_argument("--host", help="listen address (APTP_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (APTP_PORT, default 8000)")
    serve.add_argument("--device", help="torch device (APTP_DEVICE, default cpu)")
    serve.set_defaults(handler=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pruning.files import ModelFileError
    from router.pipeline import RoutedPipeline
    from server.app import serve
    from server.settings import Settings

    overrides = {k: getattr(args, k) for k in ("bundle", "host", "port", "device") if getattr(args, k) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        print(f"aptp serve: invalid setting ({problems})", file=sys.stderr)
        return 2
    try:
        pipeline = RoutedPipeline.load(settings.bundle, device=settings.device, dtype=settings.torch_dtype)
    except ModelFileError as e:
        print(f"aptp serve: {e}", file=sys.stderr)
        return 2
    codes = ", ".join(f"{c.code}: {c.macs / pipeline.teacher_macs:.2f}" for c in pipeline.codes)
    source = f"{pipeline.source} {settings.bundle}"
    print(f"aptp serve: loaded {source}: {pipeline.num_codes} code(s) (MACs x teacher {codes})")
    serve(settings, pipeline)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
