"""Where a router sends the evaluation prompts, without generating: share of prompts per code, mean MACs per U-Net
call (x teacher) overall and per tier, against the budget and the no-collapse floor of the APTP issue.

    .venv/bin/python benchmarks/routing.py --router runs/search-shapes/router --name search
    .venv/bin/python benchmarks/routing.py --bundle bundles/shapes/aptp --name aptp

Run it right after phase 1 (seconds, not the hour of `aptp eval`) to see whether a router is worth fine-tuning.
The prompts are the ones `aptp eval` scores (same seed and counts by default): the template test and held-out splits
and the paraphrase set. A router with a difficulty head (`SearchConfig.difficulty_weight`) also has its mean rating
of each tier's prompts reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from aptp.formats.files import ModelFileError
from aptp.formats.report import collect_provenance, write_report
from aptp.pipeline import RoutedPipeline
from router.model import Router
from training.evaluation.evaluate import evaluation_samples
from training.evaluation.metrics import mean_by_tier
from training.evaluation.paraphrases import PARAPHRASE_COUNT
from training.evaluation.reports import routing_summary, tier_cells


def route_splits(
    router: Router, counts: dict[str, int], seed: int, code_macs: list[int], teacher_macs: int
) -> dict[str, dict]:
    """Routing summary of each split's evaluation prompts."""
    summaries = {}
    for split, count in counts.items():
        samples = evaluation_samples(split, count, seed)
        embedding = router.encoder.encode([s.caption for s in samples]).pooled
        codes = router.route_embeddings(embedding).codes.tolist()
        tiers = np.array([s.scene.tier for s in samples])
        summaries[split] = routing_summary(codes, code_macs, teacher_macs, tiers)
        if router.difficulty is not None:
            with torch.no_grad():
                rating = router.difficulty(embedding.double()).numpy()
            summaries[split]["difficulty"] = mean_by_tier(rating, tiers)
    return summaries


def markdown(name: str, budget: float, code_ratios: list[float], summaries: dict[str, dict]) -> str:
    lines = [
        f"Routing of `{name}`: codes at {' / '.join(f'{r:.3f}' for r in code_ratios)} x teacher MACs; "
        f"budget {budget:.2f} (within 5%: {budget * 0.95:.3f}..{budget * 1.05:.3f}).",
        "",
        "| split | MACs (x teacher) | tier 1 | tier 2 | tier 3 | tier 4 | tiers 3-4 | load per code | smallest share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split, summary in summaries.items():
        ratio = summary["macs_ratio"]
        tiers = tier_cells(ratio)
        load = summary["load"].values()
        lines.append(
            f"| {split} | {ratio['overall']:.3f} | {tiers} | {summary['macs_ratio_tiers_3_4']:.3f} "
            f"| {' / '.join(f'{v:.3f}' for v in load)} | {min(load):.3f} |"
        )
    rated = {split: summary["difficulty"] for split, summary in summaries.items() if "difficulty" in summary}
    if rated:
        lines += [
            "",
            "The router's difficulty rating (its head's prediction; 0 is an average training prompt):",
            "",
            "| split | overall | tier 1 | tier 2 | tier 3 | tier 4 |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {split} | {by_tier['overall']:+.3f} | {tier_cells(by_tier)} |" for split, by_tier in rated.items()
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--router", help="router folder (phase 1's output, e.g. runs/search-shapes/router)")
    source.add_argument("--bundle", help="bundle folder (its router is used)")
    parser.add_argument("--name", required=True, help="report name: writes <out>/<name>.{json,md}")
    parser.add_argument("--budget", type=float, default=0.6, help="target MACs as a fraction of the teacher's")
    parser.add_argument("--num-prompts", type=int, default=1000, help="test-split prompts (as aptp eval)")
    parser.add_argument("--num-heldout", type=int, default=400, help="held-out-split prompts (as aptp eval)")
    parser.add_argument("--num-paraphrases", type=int, default=PARAPHRASE_COUNT, help="paraphrase-set prompts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--argmax",
        action="store_true",
        help="route each prompt to its most similar code, without the router's balancing offsets (as a search "
        "without optimal transport routes; to compare a router that has offsets with one that has none)",
    )
    parser.add_argument("--out", default="benchmarks/results/routing")
    args = parser.parse_args(argv)
    try:
        if args.router:
            router = Router.load(args.router)
        else:
            pipeline = RoutedPipeline.load(args.bundle)
            if pipeline.router is None:
                raise ModelFileError(Path(args.bundle), "a teacher folder has no router")
            router = pipeline.router
    except (ModelFileError, ValueError) as e:
        print(f"routing.py: error: {e}", file=sys.stderr)
        return 2
    if args.argmax:
        router.code_offsets.zero_()
    code_macs, teacher_macs = router.code_macs(), router.space.total_macs(router.resolution)
    counts = {"test": args.num_prompts, "heldout": args.num_heldout, "paraphrases": args.num_paraphrases}
    summaries = route_splits(router, counts, args.seed, code_macs, teacher_macs)
    code_ratios = [m / teacher_macs for m in code_macs]
    report = {
        "name": args.name,
        "source": args.router or args.bundle,
        "seed": args.seed,
        "budget": args.budget,
        "argmax": args.argmax,
        "code_macs_ratio": code_ratios,
        "splits": summaries,
    }
    table = markdown(args.name, args.budget, code_ratios, summaries)
    config = {
        "budget": args.budget,
        "num_prompts": args.num_prompts,
        "num_heldout": args.num_heldout,
        "num_paraphrases": args.num_paraphrases,
        "seed": args.seed,
        "argmax": args.argmax,
    }
    provenance = collect_provenance([args.router or args.bundle], config=config)
    write_report(args.out, args.name, report, table, echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
