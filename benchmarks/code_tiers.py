"""What each code of a bundle can do, whatever the router would choose: every evaluation prompt made by every chosen
code, scored by the domain's evaluator, per tier. It says where capacity matters: a tier whose alignment falls from
the costliest code to the cheapest is one routing should send to costly codes, a tier that keeps its alignment on
the cheapest code is one it can serve cheaply.

    .venv/bin/python benchmarks/code_tiers.py --bundle benchmarks/models/aptp-rich-0.4 --name aptp-0.4 \
        --reference benchmarks/results/sweep/teacher.json benchmarks/results/sweep/baseline-0.4.json

With every code run (no `--codes`), it also scores routing from the same images: the router's own choice per prompt
against the best fixed tier-to-code policy that spends no more MACs (what a router that knew each prompt's tier
could get from these codes; chosen on the same prompts, so a little optimistic).

Same prompts and seeds as `aptp eval` (its test split and paraphrase set), so `aptp eval` reports of other models at
the same seed (`--reference`: the teacher, a static baseline) scored the same prompts with the same noise: the table
puts their alignment on these prompts beside each code's, and each code's alignment minus the first reference's,
prompt by prompt, per tier. Writes `benchmarks/results/code_tiers/<name>.json` (with every prompt's alignment per
code) and `.md` with provenance.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

from aptp.formats.files import ModelFileError
from aptp.formats.report import collect_provenance, write_report
from aptp.pipeline import RoutedPipeline
from training.evaluation.evaluate import evaluation_samples
from training.evaluation.evaluator import DomainEvaluator, alignment, read_images
from training.evaluation.metrics import format_paired, mean_by_tier, paired_difference
from training.evaluation.reports import EvalReport, read_report

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


def reference_alignment(report: EvalReport, split: str, count: int, seed: int) -> np.ndarray:
    """The first `count` per-prompt alignments of `report` on `split`: `aptp eval` scores the same prompts with the
    same seeds as this script when its seed is the same (prompt i and its noise seed depend on i alone). ValueError
    naming the report where it scored other prompts or too few."""
    result = report.split(split)
    if report.seed != seed:
        raise ValueError(f"reference {report.name!r} was evaluated at seed {report.seed}, not --seed {seed}")
    if result is None or result.alignment_per_prompt is None or len(result.alignment_per_prompt) < count:
        scored = 0 if result is None or result.alignment_per_prompt is None else len(result.alignment_per_prompt)
        raise ValueError(f"reference {report.name!r} scores {scored} {split} prompts one by one, fewer than {count}")
    return np.asarray(result.alignment_per_prompt[:count])


def _tier_row(cells: dict[str, str]) -> str:
    return " | ".join(cells.get(f"tier{t}", "-") for t in range(1, 5))


def markdown(name: str, code_ratios: list[float], report: dict) -> str:
    references = report.get("references", {})
    lines = [
        f"### {name}: alignment of each code on every prompt",
        "",
        "| split | model | MACs (x teacher) | alignment | tier 1 | tier 2 | tier 3 | tier 4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, per_code in report["splits"].items():
        for code, scores in per_code.items():
            cells = {k: f"{v:.3f}" for k, v in scores["alignment"].items()}
            lines.append(
                f"| {split} | code {code} | {code_ratios[int(code)]:.3f} | {cells['overall']} | {_tier_row(cells)} |"
            )
        for ref_name, reference in references.items():
            scores = reference["splits"][split]
            cells = {k: f"{v:.3f}" for k, v in scores["alignment"].items()}
            lines.append(
                f"| {split} | {ref_name} | {reference['macs_ratio'][split]:.3f} | {cells['overall']} "
                f"| {_tier_row(cells)} |"
            )
    if references:
        first = next(iter(references))
        lines += [
            "",
            f"Each code's alignment minus `{first}`'s on the same prompts and seeds, per tier: mean [95% bootstrap "
            "interval over prompts].",
            "",
            "| split | code | MACs (x teacher) | all | tier 1 | tier 2 | tier 3 | tier 4 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for split, per_code in report["splits"].items():
            for code, scores in per_code.items():
                cells = {k: format_paired(v) for k, v in scores["minus_reference"].items()}
                lines.append(
                    f"| {split} | {code} | {code_ratios[int(code)]:.3f} | {cells['overall']} | {_tier_row(cells)} |"
                )
    if report.get("routing"):
        against = f" minus `{next(iter(references))}`'s" if references else ""
        lines += [
            "",
            "Routing, from the same images: the router's choice per prompt, and the tier-to-code map that gets the "
            "most alignment at no more MACs (chosen on these prompts).",
            "",
            "| split | routing | codes of tiers 1-4 | MACs (x teacher) | alignment | tier 1 | tier 2 | tier 3 "
            f"| tier 4 | all{against} |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for split, routing in report["routing"].items():
            for kind, policy in routing.items():
                cells = {k: f"{v:.3f}" for k, v in policy["alignment"].items()}
                mapping = " / ".join(str(c) for c in policy["codes"].values()) if "codes" in policy else "per prompt"
                paired = format_paired(policy["minus_reference"]["overall"]) if "minus_reference" in policy else "-"
                lines.append(
                    f"| {split} | {kind.replace('_', ' ')} | {mapping} | {policy['macs_ratio']:.3f} "
                    f"| {cells['overall']} | {_tier_row(cells)} | {paired} |"
                )
    return "\n".join(lines) + "\n"


def paired_by_tier(values: np.ndarray, reference: np.ndarray, tiers: np.ndarray) -> dict[str, dict[str, float]]:
    """`paired_difference` of `values` against `reference`, overall and per tier."""
    paired = {"overall": paired_difference(values, reference)}
    paired.update({f"tier{t}": paired_difference(values[tiers == t], reference[tiers == t]) for t in np.unique(tiers)})
    return paired


def routing_comparison(
    per_prompt: np.ndarray, chosen: np.ndarray, code_ratios: list[float], tiers: np.ndarray
) -> dict[str, dict]:
    """Alignment and MACs of the router's `chosen` code per prompt, and of the tier-to-code map that gets the most
    alignment at no more MACs, from `per_prompt[code, prompt]` (every code's alignment on every prompt)."""
    ratios = np.asarray(code_ratios)
    prompts = np.arange(per_prompt.shape[1])
    routed = per_prompt[chosen, prompts]
    result = {
        "router": {"macs_ratio": float(ratios[chosen].mean()), "alignment": mean_by_tier(routed, tiers)},
    }
    present = [int(t) for t in np.unique(tiers)]
    best = None
    for mapping in itertools.product(range(len(code_ratios)), repeat=len(present)):
        codes = np.select([tiers == t for t in present], mapping)
        macs = float(ratios[codes].mean())
        score = float(per_prompt[codes, prompts].mean())
        if macs <= result["router"]["macs_ratio"] + 1e-9 and (best is None or score > best[0]):
            best = (score, macs, codes, mapping)
    if best is not None:
        _, macs, codes, mapping = best
        result["tier_policy"] = {
            "codes": {f"tier{t}": int(c) for t, c in zip(present, mapping, strict=True)},
            "macs_ratio": macs,
            "alignment": mean_by_tier(per_prompt[codes, prompts], tiers),
            "alignment_per_prompt": per_prompt[codes, prompts].round(4).tolist(),
        }
    result["router"]["alignment_per_prompt"] = routed.round(4).tolist()
    return result


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
    parser.add_argument(
        "--reference",
        nargs="+",
        default=[],
        metavar="REPORT",
        help="`aptp eval` reports (<name>.json) of other models at the same seed, scored on the same prompts; the "
        "first is what each code is compared with, prompt by prompt",
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/code_tiers"))
    args = parser.parse_args(argv)
    try:
        pipeline = RoutedPipeline.from_pretrained(args.bundle)
        evaluator = DomainEvaluator.load(args.evaluator)
        references = [read_report(path) for path in args.reference]
        reference_scores = {
            r.name: {split: reference_alignment(r, split, args.num_prompts, args.seed) for split in args.splits}
            for r in references
        }
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
    report["references"] = {
        r.name: {
            "report": path,
            "macs_ratio": {split: r.split(split).routing.macs_ratio["overall"] for split in args.splits},
            "splits": {},
        }
        for r, path in zip(references, args.reference, strict=True)
    }
    first_reference = next(iter(reference_scores.values()), None)  # what each code is paired with
    for split in args.splits:
        samples = evaluation_samples(split, args.num_prompts, args.seed)
        tiers = np.array([s.scene.tier for s in samples])
        for name, scores in reference_scores.items():
            report["references"][name]["splits"][split] = {"alignment": mean_by_tier(scores[split], tiers)}
        report["splits"][split] = {}
        for code in codes:
            with torch.inference_mode():
                aligned = code_alignment(pipeline, evaluator, code, samples, args.seed, args.batch_size)
            scores = {"alignment": mean_by_tier(aligned, tiers), "alignment_per_prompt": aligned.round(4).tolist()}
            if first_reference is not None:
                scores["minus_reference"] = paired_by_tier(aligned, first_reference[split], tiers)
            report["splits"][split][str(code)] = scores
        if codes == list(range(pipeline.num_codes)) and pipeline.num_codes > 1:
            chosen = np.array(pipeline.route(pipeline.encode([s.caption for s in samples])).codes)
            per_prompt = np.array([report["splits"][split][str(c)]["alignment_per_prompt"] for c in codes])
            routing = routing_comparison(per_prompt, chosen, code_ratios, tiers)
            if first_reference is not None:
                for policy in routing.values():
                    policy["minus_reference"] = paired_by_tier(
                        np.asarray(policy["alignment_per_prompt"]), first_reference[split], tiers
                    )
            report.setdefault("routing", {})[split] = routing
    config = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    provenance = collect_provenance([args.bundle, args.evaluator], config=config)
    write_report(
        args.out, args.name, report, markdown(args.name, code_ratios, report), echo=True, provenance=provenance
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
