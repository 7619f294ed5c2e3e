"""`aptp eval`: prompt alignment, domain FID and CMMD of a text-to-image model on the shapes domain.

Prompts come from the `test` split (held-out prompts: same distribution as training, never trained on) and the
`heldout` split (attribute combinations never seen in training), with a fixed seed. Every figure is given next to
its real-vs-real floor: the same metric between two disjoint sets of real images. For a routed bundle it also reports
where the prompts went: the share of prompts per code and the mean MACs per U-Net call (as a fraction of the
teacher's), overall and per tier. A teacher folder is evaluated as a one-code bundle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from aptp.pipeline import RoutedPipeline
from training.data.labels import collate
from training.data.shapes import Sample, ShapesDomain
from training.evaluation.evaluator import DomainEvaluator, alignment, read_images


class EvaluatorFeatures(nn.Module):
    """The evaluator's penultimate features as a torchmetrics feature extractor (uint8 images in)."""

    def __init__(self, evaluator: DomainEvaluator):
        super().__init__()
        self.evaluator = evaluator
        self.num_features = evaluator.config.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.features(images.float() / 127.5 - 1.0).double()


def domain_fid(evaluator: DomainEvaluator, reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """torchmetrics' FID computed on the evaluator's features ("domain FID", not Inception FID)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=EvaluatorFeatures(evaluator), reset_real_features=True)
    for start in range(0, len(reference), 256):
        fid.update(reference[start : start + 256], real=True)
    for start in range(0, len(candidate), 256):
        fid.update(candidate[start : start + 256], real=False)
    return float(fid.compute())


@torch.no_grad()
def _features(evaluator: DomainEvaluator, images: torch.Tensor) -> torch.Tensor:
    extractor = EvaluatorFeatures(evaluator)
    return torch.cat([extractor(images[s : s + 256]) for s in range(0, len(images), 256)])


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Unbiased squared MMD with a Gaussian RBF kernel (the CMMD estimator, here on evaluator features), x1000."""
    gamma = 1.0 / (2 * sigma**2)

    def mean_kernel(a, b, same: bool) -> torch.Tensor:
        k = torch.exp(-gamma * torch.cdist(a, b).pow(2))
        if same:
            n = len(a)
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    return float(1000 * (mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False)))


def median_bandwidth(features: torch.Tensor) -> float:
    distances = torch.cdist(features, features)
    return float(distances[~torch.eye(len(features), dtype=torch.bool)].median())


def evaluation_samples(split: str, num_prompts: int, seed: int) -> list[Sample]:
    """The prompts (with their scenes) that `aptp eval` scores on `split`."""
    return ShapesDomain(seed=seed, split=split).batch(0, num_prompts)


def tier_cells(by_tier: dict[str, float], separator: str = " | ") -> str:
    """Tiers 1-4 of a `mean_by_tier` result as table cells, "-" for a tier with no prompts."""
    return separator.join(f"{by_tier[f'tier{t}']:.3f}" if f"tier{t}" in by_tier else "-" for t in range(1, 5))


def mean_by_tier(values: np.ndarray, tiers: np.ndarray) -> dict[str, float]:
    """Mean of `values` overall and per difficulty tier (`tiers`: one per value)."""
    result = {"overall": float(values.mean())}
    result.update({f"tier{t}": float(values[tiers == t].mean()) for t in sorted(set(tiers.tolist()))})
    return result


def routing_summary(
    codes: Sequence[int], code_macs: Sequence[int], teacher_macs: int, tiers: np.ndarray
) -> dict[str, Any]:
    """Share of prompts per code and mean MACs per U-Net call as a fraction of the teacher's, overall, per tier, and
    over tiers 3-4 together (the hard prompts, which should get more capacity than tier 1's)."""
    chosen = np.asarray(codes)
    ratios = np.asarray([code_macs[c] for c in chosen], dtype=np.float64) / teacher_macs
    hard = (tiers == 3) | (tiers == 4)
    return {
        "num_codes": len(code_macs),
        "load": {str(k): float((chosen == k).mean()) for k in range(len(code_macs))},
        "macs_ratio": mean_by_tier(ratios, tiers),
        "macs_ratio_tiers_3_4": float(ratios[hard].mean()) if hard.any() else None,
        "teacher_macs_per_call": teacher_macs,
    }


def evaluate_split(
    pipeline: RoutedPipeline,
    evaluator: DomainEvaluator,
    split: str,
    num_prompts: int,
    seed: int,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Alignment (overall, per tier), domain FID, CMMD and routing (load per code, MACs per tier) of `pipeline`
    on `num_prompts` prompts of `split`."""
    samples = evaluation_samples(split, num_prompts, seed)
    floor_samples = ShapesDomain(seed=seed, split=split).batch(num_prompts, num_prompts)  # disjoint real set
    prompts = [s.caption for s in samples]
    seeds = [seed * 100_003 + i for i in range(num_prompts)]
    made = pipeline(prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    generated = made.images
    real, _ = collate(samples)
    real_other, _ = collate(floor_samples)
    tiers = np.array([s.scene.tier for s in samples])

    def alignment_per_prompt(images: torch.Tensor) -> np.ndarray:
        read = read_images(evaluator, images)
        return np.array([alignment(s.scene, r) for s, r in zip(samples, read, strict=True)])

    aligned = alignment_per_prompt(generated)

    routing = routing_summary(made.codes, [c.macs for c in pipeline.codes], pipeline.teacher_macs, tiers)
    real_features, other_features = _features(evaluator, real), _features(evaluator, real_other)
    sigma = median_bandwidth(real_features)
    return {
        "split": split,
        "prompts": num_prompts,
        "alignment": mean_by_tier(aligned, tiers),
        "alignment_real": mean_by_tier(alignment_per_prompt(real), tiers),
        # Same prompts and seeds in every report of this seed and size, so models can be compared prompt by prompt.
        "alignment_per_prompt": [round(float(v), 4) for v in aligned],
        "domain_fid": domain_fid(evaluator, real, generated),
        "domain_fid_floor": domain_fid(evaluator, real, real_other),
        "cmmd": mmd_rbf(real_features, _features(evaluator, generated), sigma),
        "cmmd_floor": mmd_rbf(real_features, other_features, sigma),
        "tier_counts": {f"tier{t}": sum(s.scene.tier == t for s in samples) for t in range(1, 5)},
        "routing": routing,
        "_generated": generated,
        "_codes": made.codes,
        "_samples": samples,
    }


def markdown_table(name: str, results: list[dict[str, Any]]) -> str:
    lines = [
        f"### {name}",
        "",
        "| split | prompts | MACs (x teacher) | alignment | tier 1 | tier 2 | tier 3 | tier 4 | domain FID (floor) "
        "| CMMD (floor) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r["alignment"]
        tiers = tier_cells(a)
        lines.append(
            f"| {r['split']} | {r['prompts']} | {r['routing']['macs_ratio']['overall']:.3f} | {a['overall']:.3f} "
            f"| {tiers} | {r['domain_fid']:.2f} "
            f"({r['domain_fid_floor']:.2f}) | {r['cmmd']:.3f} ({r['cmmd_floor']:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def tier_grid(results: dict[str, Any], per_tier: int = 8, scale: int = 4) -> tuple[Image.Image, list[str]]:
    """A PNG grid: one row per tier, `per_tier` generated images each; returns the image and its captions."""
    rows, captions = [], []
    for tier in range(1, 5):
        picks = [i for i, s in enumerate(results["_samples"]) if s.scene.tier == tier][:per_tier]
        if not picks:
            continue
        row = torch.cat([results["_generated"][i] for i in picks], dim=2)  # (3, H, W * n)
        pad = per_tier * row.shape[1] - row.shape[2]
        rows.append(torch.nn.functional.pad(row, (0, pad)))
        captions += [f"tier {tier}, image {k + 1}: {results['_samples'][i].caption}" for k, i in enumerate(picks)]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST), captions


def code_grid(results: dict[str, Any], per_code: int = 8, scale: int = 4) -> tuple[Image.Image, list[str]]:
    """A PNG grid: one row per code that received prompts, up to `per_code` of its images."""
    rows, captions = [], []
    codes = results["_codes"]
    for code in sorted(set(codes)):
        picks = [i for i, c in enumerate(codes) if c == code][:per_code]
        row = torch.cat([results["_generated"][i] for i in picks], dim=2)
        rows.append(torch.nn.functional.pad(row, (0, per_code * row.shape[1] - row.shape[2])))
        captions += [f"code {code}, image {k + 1}: {results['_samples'][i].caption}" for k, i in enumerate(picks)]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST), captions


def write_report(out: str | Path, stem: str, report: Any, table: str, echo: bool = False) -> Path:
    """Write `<out>/<stem>.json` (the figures) and `<out>/<stem>.md` (`table`), and with `echo` print the table
    and where it went (the benchmark scripts); returns the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    if echo:
        print(table, end="")
        print(f"wrote {out / stem}.json and .md")
    return out / f"{stem}.md"


def run_eval(
    pipeline: RoutedPipeline,
    evaluator: DomainEvaluator,
    out: str | Path,
    name: str,
    num_prompts: int = 1000,
    num_heldout: int = 400,
    seed: int = 7,
    extra: dict[str, Any] | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Evaluate on both splits; writes `<name>.json`, `<name>.md` and `<name>_samples.png` (+ captions) to `out`,
    and `<name>_codes.png` (one row per code) for a multi-code bundle."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [
        evaluate_split(pipeline, evaluator, split, count, seed, steps, guidance_scale)
        for split, count in (("test", num_prompts), ("heldout", num_heldout))
    ]
    grid, captions = tier_grid(results[0])
    grid.save(out / f"{name}_samples.png")
    (out / f"{name}_samples.txt").write_text("\n".join(captions) + "\n")
    if pipeline.num_codes > 1:
        grid, captions = code_grid(results[0])
        grid.save(out / f"{name}_codes.png")
        (out / f"{name}_codes.txt").write_text("\n".join(captions) + "\n")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    # Runs once per prompt, not per U-Net call, so it is reported beside the per-call MACs rather than in them.
    adapter = {"text_adapter_macs_per_prompt": pipeline.adapter_macs_per_prompt}
    report = {"name": name, "seed": seed, **adapter, **(extra or {}), "results": clean}
    write_report(out, name, report, markdown_table(name, clean))
    return report


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """One row per evaluated model: cost, quality and routing on the test split, alignment on held-out combinations."""
    lines = [
        "| model | codes | MACs (x teacher) | alignment | tier 1 | tier 2 | tier 3 | tier 4 | held-out alignment "
        "| domain FID | CMMD | load per code | MACs (x teacher) tier 1 / 2 / 3 / 4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        test, heldout = report["results"][0], report["results"][1]
        a, routing = test["alignment"], test["routing"]
        tiers = tier_cells(a)
        load = " / ".join(f"{share:.2f}" for share in routing["load"].values())
        by_tier = tier_cells(routing["macs_ratio"], " / ")
        lines.append(
            f"| {report['name']} | {routing['num_codes']} | {routing['macs_ratio']['overall']:.3f} "
            f"| {a['overall']:.3f} | {tiers} | {heldout['alignment']['overall']:.3f} | {test['domain_fid']:.2f} "
            f"| {test['cmmd']:.3f} | {load} | {by_tier} |"
        )
    return "\n".join(lines) + "\n"


def paired_difference(
    values: Sequence[float], reference: Sequence[float], resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Mean of `values - reference`, two models' scores on the same prompts with the same seeds, and its 95%
    bootstrap interval over prompts (resampling prompts keeps each prompt's pair together)."""
    diff = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    low, high = np.quantile(diff[picks].mean(axis=1), [0.025, 0.975])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high)}


def _paired_cell(result: dict[str, Any], reference: dict[str, Any], same_seed: bool) -> str:
    values, base = result.get("alignment_per_prompt"), reference.get("alignment_per_prompt")
    if not same_seed or values is None or base is None or len(values) != len(base):
        return "-"
    d = paired_difference(values, base)
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def difference_table(reports: list[dict[str, Any]], reference: str) -> str:
    """Alignment of every model minus `reference`'s, prompt by prompt, on both splits."""
    base = next(r for r in reports if r["name"] == reference)
    lines = [
        f"Alignment minus `{reference}`'s on the same prompts and seeds: mean [95% bootstrap interval over prompts]. "
        "'-': a report without per-prompt scores (written by an older `aptp eval`) or of other prompts.",
        "",
        "| model | test | held-out |",
        "|---|---|---|",
    ]
    for report in reports:
        if report is base:
            continue
        same_seed = report.get("seed") == base.get("seed")
        cells = [_paired_cell(r, b, same_seed) for r, b in zip(report["results"], base["results"], strict=True)]
        lines.append(f"| {report['name']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def read_report(path: str | Path) -> dict[str, Any]:
    """A report written by `run_eval` (`<name>.json`); ValueError naming the file if it is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON report ({e})") from None
    results = report.get("results") if isinstance(report, dict) else None
    valid = (
        isinstance(results, list)
        and all(isinstance(r, dict) for r in results)
        and [r.get("split") for r in results] == ["test", "heldout"]
        and "routing" in results[0]
        and "name" in report
    )
    if not valid:
        raise ValueError(f"{path}: not a report of `aptp eval` (expected a name and test/heldout results with routing)")
    return report


def run_comparison(
    reports: list[dict[str, Any]], out: str | Path, name: str = "compare", reference: str | None = None
) -> Path:
    """Write `<name>.md` (the table, then each model's alignment against `reference`'s prompt by prompt when a
    reference is named) and `<name>.json` (the reports) to `out`; returns the markdown path."""
    if reference is not None and reference not in [r["name"] for r in reports]:
        raise ValueError(f"reference {reference!r} is none of the compared reports ({[r['name'] for r in reports]})")
    table = comparison_table(reports)
    if reference is not None:
        table += "\n" + difference_table(reports, reference)
    return write_report(out, name, reports, table)
