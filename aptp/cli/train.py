"""`aptp train JOB`: the domain's evaluator, the teacher, APTP's search and fine-tuning, the static baseline."""

from __future__ import annotations

import argparse
import json
import sys

from .args import positive_int


def _train_evaluator(args: argparse.Namespace) -> int:
    from training.evaluation.evaluator import train_evaluator

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

    from aptp.formats.files import ModelFileError
    from training.config import ConfigError, load_config
    from training.data.captions import DatasetError

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
        if args.dry_run:
            from training.plan import plan

            if args.job == "teacher":
                raise ConfigError("--dry-run plans search, finetune and baseline runs")
            print(plan(config))
            return 0
        getattr(module, run_name)(config)
    except (ConfigError, ModelFileError, DatasetError) as e:
        print(f"aptp train {args.job}: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="training jobs").add_subparsers(dest="job", required=True, metavar="JOB")
    evaluator = train.add_parser("evaluator", help="train the shapes domain's evaluator (classifier)")
    evaluator.add_argument("--out", default="bundles/shapes/evaluator", help="output folder")
    evaluator.add_argument("--steps", type=positive_int, default=3000)
    evaluator.add_argument("--images", type=positive_int, default=60_000, help="generated training images")
    evaluator.add_argument("--seed", type=int, default=1000)
    evaluator.add_argument("--device", default="cpu")
    evaluator.set_defaults(handler=_train_evaluator)

    for job, (_, _, _, help_text, _) in TRAIN_JOBS.items():
        parser_job = train.add_parser(job, help=f"{help_text} (resumes a killed run)")
        parser_job.add_argument("--config", required=True, help=f"YAML config, e.g. configs/shapes/{job}.yaml")
        for field in PATH_OVERRIDES:
            parser_job.add_argument(f"--{field}", help=f"{field} path (overrides the config)")
        parser_job.add_argument("--steps", type=positive_int, help="training steps (overrides the config)")
        parser_job.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override any config field, dotted for nested ones (e.g. --set num_codes=1 --set use_ot=false)",
        )
        parser_job.add_argument(
            "--dry-run",
            action="store_true",
            help="print the plan (space, MACs, budget, steps, batch, learning rates) from configs alone, without "
            "weights (the teacher may be a U-Net config folder such as configs/unets/sd-2.1)",
        )
        parser_job.set_defaults(handler=_train_job)
