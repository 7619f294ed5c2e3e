"""`aptp eval`: prompt alignment, domain FID and CMMD on the shapes domain, and comparison tables."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from .args import load_pipeline, non_negative_float, non_negative_int, positive_int


def _report_name(args: argparse.Namespace, bundle: str) -> str:
    """An evaluated bundle's report name: --name, else the bundle folder's name."""
    return args.name or pathlib.Path(bundle).name


def _eval_prompts(args: argparse.Namespace) -> int:
    """Your own model on your own prompts: CLIP score, CMMD and FID from local weight files."""
    from aptp.formats.report import collect_provenance
    from training.data.captions import DatasetError, read_prompt_file
    from training.evaluation.prompts import LocalClip, MetricFileError, evaluate_prompts

    if args.compare or len(args.bundle or []) != 1:
        print("aptp eval: error: --prompts evaluates one --bundle (and no --compare)", file=sys.stderr)
        return 2
    try:
        prompts = read_prompt_file(args.prompts)
        clip = LocalClip(args.clip, args.device) if args.clip else None
    except (DatasetError, MetricFileError) as e:
        print(f"aptp eval: error: {e}", file=sys.stderr)
        return 2
    bundle = args.bundle[0]
    pipeline = load_pipeline("eval", bundle, args.device)
    if pipeline is None:
        return 2
    name = _report_name(args, bundle)
    settings = {k: getattr(args, k) for k in ("prompts", "seed", "steps", "guidance", "clip", "inception", "device")}
    provenance = collect_provenance([bundle], config={**settings, "reference_images": args.reference_images})
    try:
        report = evaluate_prompts(
            pipeline,
            prompts,
            args.out,
            name,
            args.seed,
            args.steps,
            args.guidance,
            clip,
            args.reference_images,
            args.inception,
            provenance,
        )
    except MetricFileError as e:
        print(f"aptp eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"name": name, **report["metrics"], "not_computed": report["not_computed"]}))
    print(f"wrote {args.out}/{name}.json, .md and _codes.png")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.prompts:
        return _eval_prompts(args)
    from aptp.formats.report import collect_provenance
    from training.evaluation.evaluate import run_eval
    from training.evaluation.evaluator import DomainEvaluator
    from training.evaluation.reports import read_report, run_comparison

    earlier = []
    for path in args.compare or []:  # read first: a bad file fails before any sampling
        try:
            earlier.append(read_report(path))
        except ValueError as e:
            print(f"aptp eval: error: {e}", file=sys.stderr)
            return 2
    bundles = args.bundle or ([] if earlier else ["bundles/shapes/teacher"])
    names = [r.name for r in earlier] + [_report_name(args, bundle) for bundle in bundles]
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
        pipeline = load_pipeline("eval", bundle, args.device)
        if pipeline is None:
            return 2
        if pipeline.source == "pipeline":
            print(
                f"aptp eval: error: {bundle}: a diffusers pipeline folder; without --prompts, aptp eval scores "
                "models of the embedded shapes domain with its evaluator (give --prompts FILE, and --clip, "
                "--reference-images, --inception for CLIP score, CMMD and FID)",
                file=sys.stderr,
            )
            return 2
        pipelines.append(pipeline)
    reports = []
    for bundle, pipeline in zip(bundles, pipelines, strict=True):
        name = _report_name(args, bundle)
        extra = {"bundle": str(bundle), "steps": args.steps or pipeline.default_steps}
        settings = {
            "num_prompts": args.num_prompts,
            "num_heldout": args.num_heldout,
            "num_paraphrases": args.num_paraphrases,
            "seed": args.seed,
            "steps": extra["steps"],
            "guidance_scale": pipeline.default_guidance_scale if args.guidance is None else args.guidance,
            "device": args.device,
            "evaluator": args.evaluator,
        }
        provenance = collect_provenance([bundle, args.evaluator], config=settings)
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
            provenance=provenance,
            num_paraphrases=args.num_paraphrases,
        )
        for result in report.results:
            summary = result.model_dump(exclude={"routing", "alignment_per_prompt"})
            print(json.dumps(summary | {"name": name}))
        print(f"wrote {args.out}/{name}.json, .md and _samples.png")
        reports.append(report)
    reports = earlier + reports
    if len(reports) > 1:
        # Each compared report carries its own provenance (checksums as evaluated); the table's records its making.
        provenance = collect_provenance(config={"reports": [r.name for r in reports], "reference": args.reference})
        path = run_comparison(reports, args.out, args.compare_name, args.reference, provenance=provenance)
        print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
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
    evaluate.add_argument(
        "--prompts", metavar="FILE", help="your own model on your own prompts (one a line) instead of the shapes domain"
    )
    evaluate.add_argument("--clip", metavar="FOLDER", help="with --prompts: a local CLIP folder (CLIP score, CMMD)")
    evaluate.add_argument("--reference-images", metavar="FOLDER", help="with --prompts: real images (CMMD, FID)")
    evaluate.add_argument(
        "--inception", metavar="FILE", help="with --prompts: torch-fidelity's FID Inception weights file (FID)"
    )
    evaluate.add_argument("--out", default="benchmarks/results/eval", help="folder for the reports")
    evaluate.add_argument("--name", help="report name (default: the bundle folder's name)")
    evaluate.add_argument("--num-prompts", type=positive_int, default=1000, help="held-out prompts (test split)")
    evaluate.add_argument("--num-heldout", type=positive_int, default=400, help="prompts with unseen combinations")
    evaluate.add_argument(
        "--num-paraphrases",
        type=non_negative_int,
        default=480,
        help="prompts of the paraphrase set (training/evaluation/paraphrases.jsonl; all 480 by default, 0 skips it)",
    )
    evaluate.add_argument("--seed", type=int, default=7)
    evaluate.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's, 25)")
    evaluate.add_argument("--guidance", type=non_negative_float, help="guidance scale (default: the model's)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(handler=_eval)
