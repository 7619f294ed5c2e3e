"""Typed `aptp eval` reports, their markdown tables, and comparisons of several reports (one row per model, and
paired per-prompt differences against a reference)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from aptp.formats.files import validation_problems
from aptp.formats.report import Provenance, write_report

from .metrics import format_paired, mean_by_tier, paired_difference


class RoutingSummary(BaseModel):
    """Where one split's prompts went: share per code, mean MACs per U-Net call (x the teacher's) overall, per
    tier and over tiers 3-4 together."""

    model_config = ConfigDict(extra="allow")

    num_codes: int
    load: dict[str, float]
    macs_ratio: dict[str, float]
    macs_ratio_tiers_3_4: float | None = None
    teacher_macs_per_call: int | None = None
    code_macs_ratio: list[float] | None = None  # each code's MACs per call (x the teacher's); not in older reports


class SplitResult(BaseModel):
    """One split's figures: alignment (overall and per tier) beside the real images', domain FID and CMMD beside
    their real-vs-real floors, per-prompt alignment (same prompts and seeds in every report of this seed and size),
    and routing."""

    model_config = ConfigDict(extra="allow")

    split: Literal["test", "heldout", "paraphrases"]
    prompts: int
    alignment: dict[str, float]
    alignment_real: dict[str, float] | None = None
    alignment_per_prompt: list[float] | None = None
    domain_fid: float
    domain_fid_floor: float | None = None
    cmmd: float
    cmmd_floor: float | None = None
    tier_counts: dict[str, int] | None = None
    routing: RoutingSummary


class EvalReport(BaseModel):
    """What `aptp eval` writes to `<name>.json`: the test split, the held-out-combination split, then (in reports
    since the paraphrase set) the paraphrase set.

    Parameters:
        name (`str`): the report's name (a row of comparison tables).
        seed (`int`): the prompt and noise seed (reports of equal seeds and sizes score the same prompts).
        bundle (`str`): the evaluated folder.
        steps (`int`): sampling steps.
        text_adapter_macs_per_prompt (`int`): the text adapter's MACs per prompt (0 without one).
        results (`list[SplitResult]`): test, heldout, and paraphrases where evaluated.
        provenance (`Provenance`): commit, machine, checksums (absent in reports older than provenance).
    """

    model_config = ConfigDict(extra="allow")

    name: str
    seed: int | None = None
    bundle: str | None = None
    steps: int | None = None
    text_adapter_macs_per_prompt: int = 0
    results: list[SplitResult]
    provenance: Provenance | None = None

    @field_validator("results")
    @classmethod
    def _test_then_heldout(cls, results: list[SplitResult]) -> list[SplitResult]:
        if [r.split for r in results][:2] != ["test", "heldout"] or [r.split for r in results][2:] not in (
            [],
            ["paraphrases"],
        ):
            raise ValueError(
                f"expected the test and heldout splits (then paraphrases) in that order, got "
                f"{[r.split for r in results]}"
            )
        return results

    def split(self, name: str) -> SplitResult | None:
        """The result on split `name`, None where this report has none (paraphrases, in older reports)."""
        return next((r for r in self.results if r.split == name), None)


def tier_cells(by_tier: dict[str, float], separator: str = " | ") -> str:
    """Tiers 1-4 of a `mean_by_tier` result as table cells, "-" for a tier with no prompts."""
    return separator.join(f"{by_tier[f'tier{t}']:.3f}" if f"tier{t}" in by_tier else "-" for t in range(1, 5))


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
        "code_macs_ratio": [m / teacher_macs for m in code_macs],
    }


def markdown_table(name: str, results: Sequence[SplitResult]) -> str:
    lines = [
        f"### {name}",
        "",
        "| split | prompts | MACs (x teacher) | alignment | tier 1 | tier 2 | tier 3 | tier 4 | domain FID (floor) "
        "| CMMD (floor) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r.alignment
        lines.append(
            f"| {r.split} | {r.prompts} | {r.routing.macs_ratio['overall']:.3f} | {a['overall']:.3f} "
            f"| {tier_cells(a)} | {r.domain_fid:.2f} ({r.domain_fid_floor:.2f}) | {r.cmmd:.3f} ({r.cmmd_floor:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def comparison_table(reports: Sequence[EvalReport]) -> str:
    """One row per evaluated model: cost, quality and routing on the test split, alignment on held-out combinations
    and on paraphrases ("-" for a report without them)."""
    lines = [
        "| model | codes | MACs (x teacher) | alignment | tier 1 | tier 2 | tier 3 | tier 4 | held-out alignment "
        "| paraphrase alignment | domain FID | CMMD | load per code | MACs (x teacher) tier 1 / 2 / 3 / 4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        test, heldout, paraphrases = report.split("test"), report.split("heldout"), report.split("paraphrases")
        a, routing = test.alignment, test.routing
        tiers = tier_cells(a)
        load = " / ".join(f"{share:.2f}" for share in routing.load.values())
        by_tier = tier_cells(routing.macs_ratio, " / ")
        paraphrased = f"{paraphrases.alignment['overall']:.3f}" if paraphrases is not None else "-"
        lines.append(
            f"| {report.name} | {routing.num_codes} | {routing.macs_ratio['overall']:.3f} "
            f"| {a['overall']:.3f} | {tiers} | {heldout.alignment['overall']:.3f} | {paraphrased} "
            f"| {test.domain_fid:.2f} | {test.cmmd:.3f} | {load} | {by_tier} |"
        )
    return "\n".join(lines) + "\n"


def _paired_cell(result: SplitResult | None, reference: SplitResult | None, same_seed: bool) -> str:
    if result is None or reference is None:
        return "-"
    values, base = result.alignment_per_prompt, reference.alignment_per_prompt
    if not same_seed or values is None or base is None or len(values) != len(base):
        return "-"
    return format_paired(paired_difference(values, base))


def difference_table(reports: Sequence[EvalReport], reference: str) -> str:
    """Alignment of every model minus `reference`'s, prompt by prompt, on every set."""
    base = next(r for r in reports if r.name == reference)
    lines = [
        f"Alignment minus `{reference}`'s on the same prompts and seeds: mean [95% bootstrap interval over prompts]. "
        "'-': a report without per-prompt scores (written by an older `aptp eval`) or of other prompts.",
        "",
        "| model | test | held-out | paraphrases |",
        "|---|---|---|---|",
    ]
    for report in reports:
        if report is base:
            continue
        same_seed = report.seed == base.seed
        cells = [_paired_cell(report.split(s), base.split(s), same_seed) for s in ("test", "heldout", "paraphrases")]
        lines.append(f"| {report.name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def read_report(path: str | Path) -> EvalReport:
    """A report written by `run_eval` (`<name>.json`); ValueError naming the file if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON report ({e})") from None
    try:
        return EvalReport.model_validate(data)
    except ValidationError as e:
        problems = validation_problems(e, limit=3)
        raise ValueError(
            f"{path}: not a report of `aptp eval` (expected a name and test/heldout results with routing: {problems})"
        ) from None


def run_comparison(
    reports: Sequence[EvalReport],
    out: str | Path,
    name: str = "compare",
    reference: str | None = None,
    provenance: Provenance | None = None,
) -> Path:
    """Write `<name>.md` (the table, then each model's alignment against `reference`'s prompt by prompt when a
    reference is named) and `<name>.json` (the reports) to `out`; returns the markdown path."""
    names = [r.name for r in reports]
    if reference is not None and reference not in names:
        raise ValueError(f"reference {reference!r} is none of the compared reports ({names})")
    table = comparison_table(reports)
    if reference is not None:
        table += "\n" + difference_table(reports, reference)
    figures = [r.model_dump(mode="json") for r in reports]
    return write_report(out, name, figures, table, provenance=provenance)
