"""benchmarks/sweep.py's jobs: every command parses into a valid config of its job, and every method fine-tunes
for the same number of steps at every budget."""

from __future__ import annotations

import pytest
import yaml

from benchmarks.sweep import (
    BALANCE_FILE,
    BALANCE_PROMPTS_PER_PHRASING,
    BUDGETS,
    CODE_BUDGETS,
    DIFFICULTY_WEIGHT,
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
