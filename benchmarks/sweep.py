"""The budget sweep: APTP (K codes of different costs), APTP with one code (K = 1) and the static L1 baseline, each at
average budgets 0.4, 0.6 and 0.8 of the teacher's MACs, with the same total fine-tuning steps for every method at
every budget, each evaluated on the template test set, the held-out combinations and the paraphrase set; and the
static baseline at 0.28 as well (one channel a prunable unit), where the curve should show what pruning costs
(`LOW_BUDGETS`).

    .venv/bin/python benchmarks/sweep.py run                       # every job, in order
    .venv/bin/python benchmarks/sweep.py run --only aptp-0.6
    .venv/bin/python benchmarks/sweep.py list                      # the commands
    .venv/bin/python benchmarks/sweep.py table                     # table and plot

A job is a few `aptp` commands (search, fine-tuning or the baseline, then `aptp eval`). Every one resumes: a step
whose output exists is skipped, and the training commands resume from their checkpoints, so the sweep can be run a
few hours at a time. Reports go to `benchmarks/results/sweep/<job>.json` (with provenance); `table` writes
`sweep.md` (the table, with each method's alignment against the baseline's at the same budget, prompt by prompt, and
where each model's capacity went: its codes' MACs, routed MACs, smallest code share and tiers 3-4's MACs over tier 1's
per set, and its share of the teacher's alignment; and what pruning costs each tier, every model's alignment against
the teacher's per tier, prompt by prompt) and `sweep.svg` (alignment and domain FID against MACs, one line per
method).

The APTP jobs fit their code offsets on `<runs>/balance-prompts.txt` (written by `run`: training-split scenes captioned
in both phrasings the sets use), so that the codes split the evaluated prompts, not only the training captions,
about evenly (`SearchConfig.balance_prompts_file`), and learn each prompt's difficulty, so that harder prompts take
the costlier codes (`SearchConfig.difficulty_weight`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from svg import Panel, Series, panels_svg  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks/results/sweep"
RESULTS_ARGUMENT = str(RESULTS.relative_to(REPO))  # the commands run in the repository
# The retrained teacher (configs/shapes/teacher.yaml), committed so that every session can run the sweep's jobs on it.
TEACHER = "benchmarks/models/teacher-rich"
BUDGETS = (0.4, 0.6, 0.8)
# K = 4 codes whose targets spread around the average budget (a factor of 2.1 at 0.6), capped at the teacher. Every
# target lies above the width floor's cost, which the search checks before training
# (`training.search.check_targets_above_floor`): on the retrained teacher min_width 0.25 (configs/shapes/search.yaml)
# leaves 0.392 of its MACs at the least, 0.125 leaves 0.291. The report `aptp-0.6` was made before that check, with
# targets [0.36, 0.51, 0.69, 0.84]: its cheapest code sat at the floor (0.392); so did two of the first `aptp-0.4`'s
# (in git history), which `aptp-0.4` with these settings replaced.
CODE_BUDGETS = {0.4: [0.3, 0.35, 0.43, 0.52], 0.6: [0.4, 0.51, 0.67, 0.82], 0.8: [0.6, 0.74, 0.88, 0.98]}
# The width floor of each budget's searches (APTP and K = 1 alike), where it is not the config's 0.25: at 0.4 the
# floor of 0.25 would leave K = 1 almost nothing to choose and APTP's cheap codes nowhere to go.
MIN_WIDTH = {0.4: 0.125}
METHODS = ("aptp", "aptp-k1", "baseline")
# Budgets under the issue's, for the static baseline alone: from 0.30 to 0.53 of the teacher's MACs alignment hardly
# moves (benchmarks/results/code_tiers/aptp-0.4), so the curve needs a point where pruning starts to cost quality.
# 0.28: just over the retrained teacher's width floor, one channel in each prunable unit (0.279; the L1 pruner
# refuses less).
LOW_BUDGETS = (0.28,)
# Fine-tuning steps of every method at every budget: APTP's shared stage plus its codes' steps, K = 1's and the
# baseline's all in one (configs/shapes/finetune.yaml and baseline.yaml: 1800 + 4 x 150 = 2400).
TOTAL_STEPS = 2400
SETS = ("test", "heldout", "paraphrases")
TIERS = (1, 2, 3, 4)
# The codes split prompts like those the sweep evaluates evenly: training-split scenes captioned both ways the
# sets are phrased (the template test and held-out sets, and rich captions); offsets fitted on rich captions alone
# sent 40% of the template prompts to the cheapest code and left their routed average 10% under the budget.
BALANCE_PROMPTS_PER_PHRASING = 2500
BALANCE_FILE = "balance-prompts.txt"
# The capacity term's weight (`SearchConfig.difficulty_weight`): the shipped router's best and second-best scores
# differ by 0.0035 for the median prompt, and a short search's head rated tiers 1 to 4 -0.13 to +0.07 on average, so
# at weight 1 the term (weight x difficulty x code cost offsets of about +-0.25) outweighs architecture similarity
# (docs/experiments.md, routing by difficulty). Without it, the codes of `sweep/aptp-0.6` on the first retrained
# teacher gave tiers 3-4 1.12x the MACs of tier 1.
DIFFICULTY_WEIGHT = 1.0


def job_name(method: str, budget: float) -> str:
    return "teacher" if method == "teacher" else f"{method}-{budget}"


def commands(method: str, budget: float, teacher: str, runs: Path) -> list[tuple[Path, list[str]]]:
    """(output that marks the step done, `aptp` arguments) for each step of one job. The training steps use the
    rich captions the retrained teacher learned (the configs' `phrasing: templates` is the shipped teacher's)."""
    rich = ["--set", "phrasing=rich"]
    name = job_name(method, budget)
    if method == "teacher":
        return [
            (RESULTS / "teacher.json", ["eval", "--bundle", teacher, "--name", "teacher", "--out", RESULTS_ARGUMENT])
        ]
    folder = runs / name
    bundle = folder / "bundle"
    steps: list[tuple[Path, list[str]]] = []
    if method == "baseline":
        steps.append(
            (
                bundle / "manifest.json",
                ["train", "baseline", "--config", "configs/shapes/baseline.yaml", "--teacher", teacher]
                + ["--out", str(folder / "baseline"), "--export", str(bundle), "--set", f"budget={budget}"]
                + ["--set", f"expert.steps={TOTAL_STEPS}", *rich],
            )
        )
    else:
        search = ["train", "search", "--config", "configs/shapes/search.yaml", "--teacher", teacher]
        search += ["--out", str(folder / "search"), "--set", f"budget={budget}", *rich]
        if budget in MIN_WIDTH:
            search += ["--set", f"min_width={MIN_WIDTH[budget]}"]
        finetune = ["train", "finetune", "--config", "configs/shapes/finetune.yaml", "--teacher", teacher]
        finetune += ["--router", str(folder / "search" / "router"), "--out", str(folder / "finetune")]
        finetune += ["--export", str(bundle), *rich]
        if method == "aptp":
            targets = ",".join(str(t) for t in CODE_BUDGETS[budget])
            search += ["--set", f"code_budgets=[{targets}]", "--set", f"balance_prompts_file={runs / BALANCE_FILE}"]
            search += ["--set", f"difficulty_weight={DIFFICULTY_WEIGHT}"]
        else:
            search += ["--set", "num_codes=1"]
            finetune += ["--set", "shared_steps=0", "--set", f"expert.steps={TOTAL_STEPS}"]
        steps += [(folder / "search" / "router" / "config.json", search), (bundle / "manifest.json", finetune)]
    evaluate = ["eval", "--bundle", str(bundle), "--name", name, "--out", RESULTS_ARGUMENT]
    steps.append((RESULTS / f"{name}.json", evaluate))
    return steps


def all_jobs(only: list[str] | None) -> list[tuple[str, float]]:
    jobs = [("teacher", 1.0)] + [(method, budget) for budget in BUDGETS for method in METHODS]
    jobs += [("baseline", budget) for budget in LOW_BUDGETS]
    if only:
        unknown = set(only) - {job_name(m, b) for m, b in jobs}
        if unknown:
            raise SystemExit(f"--only: no job named {sorted(unknown)} (jobs: {[job_name(m, b) for m, b in jobs]})")
        jobs = [(m, b) for m, b in jobs if job_name(m, b) in only]
    return jobs


def write_balance_prompts(path: Path) -> None:
    """The prompts the APTP jobs' code offsets are fitted on (`BALANCE_PROMPTS_PER_PHRASING` training-split scenes,
    captioned in each phrasing), written once."""
    from training.data.shapes import PHRASINGS, ShapesDomain

    lines = ["# training-split scenes, captioned in every phrasing: what the sweep's codes are balanced on"]
    for phrasing in PHRASINGS:
        domain = ShapesDomain(seed=1, split="train", phrasing=phrasing)
        lines += [sample.caption for sample in domain.batch(0, BALANCE_PROMPTS_PER_PHRASING)]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)


def run(args: argparse.Namespace) -> int:
    aptp = str(Path(sys.executable).with_name("aptp"))
    balance = Path(args.runs) / BALANCE_FILE
    if any(method == "aptp" for method, _ in all_jobs(args.only)) and not balance.exists():
        write_balance_prompts(balance)
    for method, budget in all_jobs(args.only):
        for done, arguments in commands(method, budget, args.teacher, Path(args.runs)):
            if done.exists():
                print(f"[{job_name(method, budget)}] done already: {done}", flush=True)
                continue
            print(f"[{job_name(method, budget)}] aptp {' '.join(arguments)}", flush=True)
            if subprocess.run([aptp, *arguments], cwd=REPO).returncode != 0:
                print(f"[{job_name(method, budget)}] failed; run the sweep again to resume", file=sys.stderr)
                return 1
    return 0


# ---------------------------------------------------------------------------------------------- table and plot
def _reports():
    from training.evaluation.reports import read_report

    found = {}
    for method, budget in all_jobs(None):
        path = RESULTS / f"{job_name(method, budget)}.json"
        if path.exists():
            found[(method, budget)] = read_report(path)
    return found


def table(args: argparse.Namespace) -> int:
    from aptp.formats.report import collect_provenance, write_report
    from training.evaluation.metrics import format_paired, paired_difference

    reports = _reports()
    if not reports:
        print(f"no sweep reports in {RESULTS} yet", file=sys.stderr)
        return 1
    lines = [
        "| method | budget | MACs (x teacher) | test | held-out | paraphrases | paraphrases tier 3 | domain FID "
        "| minus the baseline's alignment: test / held-out / paraphrases |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    figures = []
    for (method, budget), report in _by_budget(reports):
        splits = {s: report.split(s) for s in SETS}
        row = {
            "method": method,
            "budget": budget,
            "macs_ratio": splits["test"].routing.macs_ratio["overall"],
            "domain_fid": splits["test"].domain_fid,
        }
        row |= {s: (r.alignment["overall"] if r is not None else None) for s, r in splits.items()}
        baseline = reports.get(("baseline", budget))
        paired = []
        for s in SETS:
            ours, theirs = splits[s], baseline.split(s) if baseline is not None else None
            if method == "baseline" or ours is None or theirs is None or ours.alignment_per_prompt is None:
                paired.append("-")
                continue
            d = paired_difference(ours.alignment_per_prompt, theirs.alignment_per_prompt)
            row[f"minus_baseline_{s}"] = d
            paired.append(format_paired(d))
        tier3 = splits["paraphrases"].alignment.get("tier3") if splits["paraphrases"] is not None else None
        cells = [f"{row[s]:.3f}" if row[s] is not None else "-" for s in SETS]
        lines.append(
            f"| {method} | {budget} | {row['macs_ratio']:.3f} | {' | '.join(cells)} | "
            f"{'-' if tier3 is None else f'{tier3:.3f}'} | {row['domain_fid']:.1f} | {' / '.join(paired)} |"
        )
        figures.append(row)
    capacity, capacity_figures = capacity_table(reports)
    tier_cost, tier_cost_figures = tier_cost_table(reports)
    for row in figures:
        row |= capacity_figures.get((row["method"], row["budget"]), {})
        row |= tier_cost_figures.get((row["method"], row["budget"]), {})
    # Before any of its own files is written: rewriting the plot must not mark the table's tree dirty
    provenance = collect_provenance(config={"reports": sorted(job for job in map(str, reports))})
    (RESULTS / "sweep.svg").write_text(plot(figures))
    tables = [lines, capacity, tier_cost] if tier_cost else [lines, capacity]
    text = "\n\n".join("\n".join(t) for t in tables) + "\n\n![alignment and domain FID against MACs](sweep.svg)\n"
    write_report(RESULTS, "sweep", figures, text, echo=True, provenance=provenance)
    return 0


def capacity_table(reports: dict) -> tuple[list[str], dict[tuple[str, float], dict]]:
    """Where each pruned model's capacity went, per set: its routed MACs against the budget, the smallest share of
    prompts a code took, tiers 3-4's MACs over tier 1's, and its alignment as a share of the teacher's (the capacity
    issue's bars: codes spanning 0.40 to 0.80 at the 0.6 budget, routed MACs within 5% of the budget, every code at
    least 5% of the prompts, tiers 3-4 at least 1.3x tier 1, and at least 0.98 of the teacher's alignment at 0.6).
    Returns the markdown lines and the figures by (method, budget)."""
    teacher = reports.get(("teacher", 1.0))
    lines = [
        "Capacity, per set (test / held-out / paraphrases):",
        "",
        "| method | budget | codes (x teacher MACs) | routed MACs | smallest code share | tiers 3-4 / tier 1 MACs "
        "| of the teacher's alignment |",
        "|---|---|---|---|---|---|---|",
    ]
    figures = {}
    for (method, budget), report in _by_budget(reports):
        if method == "teacher":
            continue
        splits = [report.split(s) for s in SETS]
        routings = [split.routing if split is not None else None for split in splits]
        codes = next((r.code_macs_ratio for r in routings if r is not None and r.code_macs_ratio), None)
        row: dict = {"code_macs_ratio": codes}
        row["routed_macs"] = [r.macs_ratio["overall"] if r is not None else None for r in routings]
        row["smallest_share"] = [min(r.load.values()) if r is not None else None for r in routings]
        row["tiers_3_4_over_tier_1"] = [
            r.macs_ratio_tiers_3_4 / r.macs_ratio["tier1"]
            if r is not None and r.macs_ratio_tiers_3_4 is not None and "tier1" in r.macs_ratio
            else None
            for r in routings
        ]
        row["of_teacher_alignment"] = [
            split.alignment["overall"] / teacher.split(name).alignment["overall"]
            if split is not None and teacher is not None and teacher.split(name) is not None
            else None
            for split, name in zip(splits, SETS, strict=True)
        ]
        figures[(method, budget)] = row
        spread = "-" if not codes else f"{min(codes):.3f}-{max(codes):.3f} ({max(codes) / min(codes):.2f}x)"
        single = report.split("test").routing.num_codes == 1
        lines.append(
            f"| {method} | {budget} | {spread} | {_cells(row['routed_macs'], '.3f')} "
            f"| {'-' if single else _cells(row['smallest_share'], '.3f')} "
            f"| {'-' if single else _cells(row['tiers_3_4_over_tier_1'], '.2f')} "
            f"| {_cells(row['of_teacher_alignment'], '.3f')} |"
        )
    return lines, figures


def tier_cost_table(reports: dict) -> tuple[list[str], dict[tuple[str, float], dict]]:
    """What pruning costs each tier: every pruned model's alignment minus the teacher's on the same prompts and
    seeds, per tier and set, with its 95% bootstrap interval over prompts. It says where capacity matters: a tier
    that loses alignment as the budget falls needs costly codes, one that keeps it can be served cheaply. Empty when
    the teacher's report is missing or was scored on other prompts. Returns the markdown lines and the figures (per
    set, per tier: mean, low, high) by (method, budget)."""
    from training.evaluation.evaluate import evaluation_samples
    from training.evaluation.metrics import format_paired, paired_difference

    teacher = reports.get(("teacher", 1.0))
    if teacher is None or teacher.seed is None:
        return [], {}
    tiers = {}
    for name in SETS:
        split = teacher.split(name)
        if split is not None and split.alignment_per_prompt is not None:
            tiers[name] = np.array([s.scene.tier for s in evaluation_samples(name, split.prompts, teacher.seed)])
    lines = [
        "Alignment minus the teacher's per tier, prompt by prompt (mean [95% interval]):",
        "",
        "| method | budget | set | tier 1 | tier 2 | tier 3 | tier 4 |",
        "|---|---|---|---|---|---|---|",
    ]
    figures = {}
    for (method, budget), report in _by_budget(reports):
        if method == "teacher" or report.seed != teacher.seed:
            continue
        row = {}
        for name, by_prompt in tiers.items():
            ours, theirs = report.split(name), teacher.split(name)
            if ours is None or ours.alignment_per_prompt is None or len(ours.alignment_per_prompt) != len(by_prompt):
                continue
            values, reference = np.asarray(ours.alignment_per_prompt), np.asarray(theirs.alignment_per_prompt)
            cells = {
                f"tier{t}": paired_difference(values[by_prompt == t], reference[by_prompt == t])
                for t in TIERS
                if (by_prompt == t).any()
            }
            row[name] = cells
            text = " | ".join(format_paired(cells[f"tier{t}"]) if f"tier{t}" in cells else "-" for t in TIERS)
            lines.append(f"| {method} | {budget} | {name} | {text} |")
        if row:
            figures[(method, budget)] = {"minus_teacher_by_tier": row}
    return (lines if figures else []), figures


def _by_budget(reports: dict) -> list:
    """The reports' (job, report) pairs by budget, then method: the tables' row order."""
    return sorted(reports.items(), key=lambda kv: (kv[0][1], kv[0][0]))


def _cells(values: list[float | None], form: str) -> str:
    return " / ".join("-" if v is None else format(v, form) for v in values)


def _points(rows: list[dict], method: str, key: str) -> list[tuple[float, float]]:
    return [(r["macs_ratio"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None]


def plot(rows: list[dict]) -> str:
    """An SVG of four panels (alignment on each set, and domain FID) against MACs, one line per method."""
    keys = [*(("alignment, " + s, s) for s in SETS), ("domain FID (test)", "domain_fid")]
    colours = {"aptp": "#d62728", "aptp-k1": "#1f77b4", "baseline": "#2ca02c", "teacher": "#000000"}
    panels = [
        Panel(
            title,
            "MACs (x teacher)",
            (min(0.3, *(b - 0.1 for b in LOW_BUDGETS)), 1.05),
            [Series(method, colour, _points(rows, method, key)) for method, colour in colours.items()],
        )
        for title, key in keys
    ]
    return panels_svg(panels, colours)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "list"):
        command = sub.add_parser(name)
        command.add_argument("--teacher", default=TEACHER, help="the teacher every job prunes")
        command.add_argument("--runs", default="runs/sweep", help="where the jobs' run folders go")
        command.add_argument("--only", nargs="+", metavar="JOB", help="e.g. aptp-0.6 baseline-0.4")
    sub.add_parser("table")
    args = parser.parse_args(argv)
    if args.command == "table":
        return table(args)
    if args.command == "list":
        for method, budget in all_jobs(args.only):
            for done, arguments in commands(method, budget, args.teacher, Path(args.runs)):
                marker = done.relative_to(REPO) if done.is_absolute() else done
                print(f"aptp {' '.join(arguments)}    # done when {marker}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
