"""What each code of a bundle can do, whatever the router would choose: every evaluation prompt made by every chosen
code, scored by the domain's evaluator, per tier. It says where capacity matters: a tier whose alignment falls from
the costliest code to the cheapest is one routing should send to costly codes, a tier that keeps its alignment on
the cheapest code is one it can serve cheaply.

    .venv/bin/python benchmarks/code_tiers.py --bundle runs/sweep/aptp-0.6/bundle --codes 0 3 --name aptp-0.6

Same prompts and seeds as `aptp eval` (its test split and paraphrase set). Writes
`benchmarks/results/code_tiers/<name>.json` and `.md` with provenance.
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
from training.evaluation.evaluate import evaluation_samples
from training.evaluation.evaluator import DomainEvaluator, alignment, read_images
from training.evaluation.metrics import mean_by_tier

REPO = Path(__file__).resolve().parent.parent


def code_images(pipeline: RoutedPipeline, code: int, samples: list, seed: int, batch_size: int) -> torch.Tensor:
    """uint8 images `(N, 3, H, W)` of `samples`' prompts, all made by `code`'s expert, with the seeds `aptp eval`
    gives them (`training.evaluation.evaluate.evaluate_samples`)."""
    encoded = pipeline.encode([s.caption for s in samples])
    steps, guidance = pipeline.default_steps, pipeline.default_guidance_scale
    chunks = []
    for start in range(0, len(samples), batch_size):
        rows = list(range(start, min(start + batch_size, len(samples))))
        seeds = [seed * 100_003 + i for i in rows]
        chunks.append(pipeline.generate(code, encoded.select(rows), seeds, steps, [guidance] * len(rows)))
    return torch.cat(chunks)


def code_alignment(
    pipeline: RoutedPipeline, evaluator: DomainEvaluator, code: int, samples: list, seed: int, batch_size: int
) -> np.ndarray:
    """Alignment of each of `samples`' prompts made by `code`'s expert (`code_images`)."""
    images = code_images(pipeline, code, samples, seed, batch_size)
    return np.array([alignment(s.scene, r) for s, r in zip(samples, read_images(evaluator, images), strict=True)])


def markdown(name: str, code_ratios: list[float], report: dict) -> str:
    lines = [
        f"### {name}: alignment of each code on every prompt",
        "",
        "| split | code | MACs (x teacher) | alignment | tier 1 | tier 2 | tier 3 | tier 4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, per_code in report["splits"].items():
        for code, cells in per_code.items():
            tiers = " | ".join(f"{cells.get(f'tier{t}', float('nan')):.3f}" for t in range(1, 5))
            lines.append(f"| {split} | {code} | {code_ratios[int(code)]:.3f} | {cells['overall']:.3f} | {tiers} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--codes", type=int, nargs="+", help="codes to run (default: every code)")
    parser.add_argument("--evaluator", default="bundles/shapes/evaluator")
    parser.add_argument(
        "--splits", nargs="+", default=["test", "paraphrases"], choices=["test", "heldout", "paraphrases"]
    )
    parser.add_argument("--num-prompts", type=int, default=400, help="prompts per split")
    parser.add_argument("--seed", type=int, default=7, help="as `aptp eval`'s, so the prompts and seeds are its")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/code_tiers"))
    args = parser.parse_args(argv)
    try:
        pipeline = RoutedPipeline.from_pretrained(args.bundle)
        evaluator = DomainEvaluator.load(args.evaluator)
    except (ModelFileError, ValueError) as e:
        print(f"code_tiers.py: error: {e}", file=sys.stderr)
        return 2
    codes = args.codes if args.codes is not None else list(range(pipeline.num_codes))
    unknown = [c for c in codes if not 0 <= c < pipeline.num_codes]
    if unknown:
        print(
            f"code_tiers.py: error: --codes {unknown}: the bundle has codes 0 to {pipeline.num_codes - 1}",
            file=sys.stderr,
        )
        return 2
    code_ratios = [c.macs / pipeline.teacher_macs for c in pipeline.codes]
    report: dict = {"name": args.name, "bundle": args.bundle, "code_macs_ratio": code_ratios, "splits": {}}
    for split in args.splits:
        samples = evaluation_samples(split, args.num_prompts, args.seed)
        tiers = np.array([s.scene.tier for s in samples])
        with torch.inference_mode():
            report["splits"][split] = {
                str(code): mean_by_tier(
                    code_alignment(pipeline, evaluator, code, samples, args.seed, args.batch_size), tiers
                )
                for code in codes
            }
    config = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    provenance = collect_provenance([args.bundle, args.evaluator], config=config)
    write_report(
        args.out, args.name, report, markdown(args.name, code_ratios, report), echo=True, provenance=provenance
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
