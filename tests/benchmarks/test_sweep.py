"""benchmarks/sweep.py's jobs: every command parses into a valid config of its job, and every method fine-tunes
for the same number of steps at every budget."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.sweep import (
    BALANCE_FILE,
    BALANCE_PROMPTS_PER_PHRASING,
    BUDGETS,
    CODE_BUDGETS,
    DIFFICULTY_WEIGHT,
    MIN_WIDTH,
    SETS,
    TEACHER,
    TOTAL_STEPS,
    all_jobs,
    commands,
    write_balance_prompts,
)
from training.baseline import BaselineConfig
from training.config import load_config
from training.finetune import FinetuneConfig
from training.search import SearchConfig

CONFIGS = {"search": SearchConfig, "finetune": FinetuneConfig, "baseline": BaselineConfig}


def _config(arguments: list[str]):
    """The config an `aptp train JOB ...` command line would run with (its overrides as the CLI reads them)."""
    job, overrides, i = arguments[1], {}, 2
    path = None
    while i < len(arguments):
        flag, value = arguments[i], arguments[i + 1]
        if flag == "--config":
            path = value
        elif flag == "--set":
            key, _, text = value.partition("=")
            overrides[key] = yaml.safe_load(text)
        else:
            overrides[flag.removeprefix("--")] = value
        i += 2
    return load_config(path, CONFIGS[job], overrides)


@pytest.mark.parametrize("method, budget", [job for job in all_jobs(None) if job[0] != "teacher"])
def test_every_training_command_is_a_valid_config_of_its_budget(method, budget, tmp_path):
    steps = commands(method, budget, "bundles/shapes/teacher", tmp_path)
    trained = [_config(arguments) for _, arguments in steps if arguments[0] == "train"]
    assert steps[-1][1][0] == "eval"
    assert all(config.phrasing == "rich" for config in trained)  # the retrained teacher's captions
    if method == "baseline":
        (baseline,) = trained
        assert baseline.budget == budget and baseline.expert.steps == TOTAL_STEPS
        return
    search, finetune = trained
    assert search.budget == budget
    codes = 4 if method == "aptp" else 1
    assert search.num_codes == codes and finetune.total_steps(codes) == TOTAL_STEPS
    if method == "aptp":
        assert search.code_budgets == CODE_BUDGETS[budget]
        assert search.balance_prompts_file == tmp_path / BALANCE_FILE  # balanced on every phrasing evaluated
        assert search.difficulty_weight == DIFFICULTY_WEIGHT > 0  # harder prompts to costlier codes
    else:
        assert search.difficulty_weight == 0  # one code: nothing to choose between
    assert search.min_width == MIN_WIDTH.get(budget, load_config("configs/shapes/search.yaml", SearchConfig).min_width)


def test_every_search_reaches_its_targets_above_the_width_floor_of_the_sweeps_teacher(tmp_path):
    """The search's own check, run on the teacher the sweep trains from: a job whose targets lie under the width
    floor would be refused at its start (or, before the check, route over its budget)."""
    from aptp.formats.describe import describe_model
    from training.search import check_targets_above_floor

    _, space, _ = describe_model(TEACHER)
    searches = [
        _config(arguments)
        for method, budget in all_jobs(None)
        if method.startswith("aptp")
        for _, arguments in commands(method, budget, TEACHER, tmp_path)
        if arguments[:2] == ["train", "search"]
    ]
    assert len(searches) == 2 * len(BUDGETS)
    for search in searches:
        assert check_targets_above_floor(search, space, space.default_resolution) is not None


def test_the_balance_prompts_are_training_scenes_in_every_phrasing(tmp_path):
    from training.data.captions import read_prompt_file
    from training.data.shapes import PHRASINGS, ShapesDomain

    path = tmp_path / BALANCE_FILE
    write_balance_prompts(path)
    prompts = read_prompt_file(path)
    assert len(prompts) == len(PHRASINGS) * BALANCE_PROMPTS_PER_PHRASING
    first_scene = [ShapesDomain(seed=1, split="train", phrasing=p).sample(0).caption for p in PHRASINGS]
    assert all(caption in prompts for caption in first_scene) and first_scene[0] != first_scene[1]


def test_the_codes_of_every_budget_span_a_factor_two_at_the_middle_one():
    assert set(CODE_BUDGETS) == set(BUDGETS)
    cheapest, costliest = min(CODE_BUDGETS[0.6]), max(CODE_BUDGETS[0.6])
    assert cheapest <= 0.40 and costliest >= 0.80  # the capacity issue's bar at the 0.6 budget


def test_an_unknown_job_is_named():
    with pytest.raises(SystemExit, match="aptp-0.5"):
        all_jobs(["aptp-0.5"])


def _split(name: str, alignment: float, load: dict[str, float], by_tier: dict[str, float], codes: list[float]):
    tiers = [1, 2, 3, 4] * 2
    return {
        "split": name,
        "prompts": len(tiers),
        "alignment": {"overall": alignment, "tier3": alignment - 0.1},
        "alignment_per_prompt": [alignment + 0.01 * (i % 3 - 1) for i in range(len(tiers))],
        "domain_fid": 60.0,
        "cmmd": 0.1,
        "routing": {
            "num_codes": len(load),
            "load": load,
            "macs_ratio": by_tier,
            "macs_ratio_tiers_3_4": (by_tier["tier3"] + by_tier["tier4"]) / 2,
            "code_macs_ratio": codes,
        },
    }


def _report(path, name: str, alignment: float, load, by_tier, codes) -> None:
    results = [_split(s, alignment - 0.1 * i, load, by_tier, codes) for i, s in enumerate(SETS)]
    path.write_text(json.dumps({"name": name, "results": results}))


def test_the_table_shows_where_each_models_capacity_went(tmp_path, monkeypatch):
    import benchmarks.sweep as sweep

    monkeypatch.setattr(sweep, "RESULTS", tmp_path)
    whole = {"overall": 1.0, "tier1": 1.0, "tier2": 1.0, "tier3": 1.0, "tier4": 1.0}
    _report(tmp_path / "teacher.json", "teacher", 0.9, {"0": 1.0}, whole, [1.0])
    routed = {"overall": 0.6, "tier1": 0.4, "tier2": 0.5, "tier3": 0.7, "tier4": 0.8}
    shares = {"0": 0.1, "1": 0.2, "2": 0.3, "3": 0.4}
    _report(tmp_path / "aptp-0.6.json", "aptp-0.6", 0.88, shares, routed, [0.36, 0.5, 0.7, 0.84])
    static = {"overall": 0.6, "tier1": 0.6, "tier2": 0.6, "tier3": 0.6, "tier4": 0.6}
    _report(tmp_path / "baseline-0.6.json", "baseline-0.6", 0.87, {"0": 1.0}, static, [0.6])
    assert sweep.main(["table"]) == 0
    text = (tmp_path / "sweep.md").read_text()
    # codes 0.36 to 0.84, tiers 3-4 at (0.7 + 0.8) / 2 over tier 1's 0.4, alignment 0.88 / 0.9 on the test set
    assert "| aptp | 0.6 | 0.360-0.840 (2.33x) | 0.600 / 0.600 / 0.600 | 0.100 / 0.100 / 0.100 " in text
    assert "| 1.88 / 1.88 / 1.88 | 0.978 / 0.975 / 0.971 |" in text
    assert "| baseline | 0.6 | 0.600-0.600 (1.00x) | 0.600 / 0.600 / 0.600 | - | - | 0.967 / 0.963 / 0.957 |" in text
    figures = {(r["method"], r["budget"]): r for r in json.loads((tmp_path / "sweep.json").read_text())}
    assert figures[("aptp", 0.6)]["tiers_3_4_over_tier_1"] == pytest.approx([1.875] * 3)


def test_the_table_says_what_pruning_costs_each_tier_against_the_teacher(tmp_path, monkeypatch):
    """A pruned model that loses half its alignment on tier-3 prompts alone: the table puts the loss on tier 3."""
    import benchmarks.sweep as sweep
    from training.evaluation.evaluate import evaluation_samples

    monkeypatch.setattr(sweep, "RESULTS", tmp_path)
    count = 40
    whole = {"overall": 1.0, "tier1": 1.0, "tier2": 1.0, "tier3": 1.0, "tier4": 1.0}
    for name, tier3_alignment in (("teacher", 1.0), ("baseline-0.6", 0.5)):
        results = []
        for split in SETS:
            tiers = [s.scene.tier for s in evaluation_samples(split, count, seed=7)]
            per_prompt = [tier3_alignment if t == 3 else 1.0 for t in tiers]
            result = _split(split, sum(per_prompt) / count, {"0": 1.0}, whole, [1.0])
            results.append(result | {"prompts": count, "alignment_per_prompt": per_prompt})
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "seed": 7, "results": results}))
    assert sweep.main(["table"]) == 0
    text = (tmp_path / "sweep.md").read_text()
    flat = "+0.000 [+0.000, +0.000]"
    assert f"| baseline | 0.6 | paraphrases | {flat} | {flat} | -0.500 [-0.500, -0.500] | {flat} |" in text
    figures = {(r["method"], r["budget"]): r for r in json.loads((tmp_path / "sweep.json").read_text())}
    by_tier = figures[("baseline", 0.6)]["minus_teacher_by_tier"]
    assert set(by_tier) == set(SETS) and by_tier["test"]["tier3"]["mean"] == pytest.approx(-0.5)
