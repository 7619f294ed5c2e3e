"""The Stable Diffusion configs load, validate and plan against the SD-shaped U-Net configs, without weights."""

from __future__ import annotations

import re

import pytest

from aptp.cli.main import main
from tests.helpers import REPO


@pytest.mark.parametrize("model, macs", [("sd-1.5", "401.64 GMACs"), ("sd-2.1", "1074.55 GMACs")])
@pytest.mark.parametrize("job", ["search", "finetune", "baseline"])
def test_the_sd_configs_plan_without_weights(model, macs, job, capsys):
    config = REPO / "configs" / model / f"{job}.yaml"
    unet = REPO / "configs" / "unets" / model
    assert main(["train", job, "--config", str(config), "--dry-run", "--teacher", str(unet)]) == 0
    plan = capsys.readouterr().out
    assert f"MACs per call    {macs}" in plan and "cross-attention over 77 tokens" in plan
    if job == "search":
        assert "K = 8" in plan and "steps            5000 (500 predictor warm-up), batch 64, lr 1.60e-03" in plan
        assert "p = 0.78 of the teacher's MACs" in plan
    else:
        assert "fine-tuning" in plan and "batch 64, lr 8.00e-05" in plan


def test_a_plan_of_a_pipeline_folder_states_the_vae_and_text_encoder(tiny_sd, capsys):
    config = REPO / "configs" / "sd-2.1" / "search.yaml"
    assert main(["train", "search", "--config", str(config), "--dry-run", "--teacher", str(tiny_sd)]) == 0
    plan = capsys.readouterr().out
    assert "(pipeline)" in plan and "8x8 latents (32x32 pixels)" in plan and "VAE decoder per image" in plan


def test_a_baseline_plan_states_the_cheapest_network_l1_pruning_leaves_and_refuses_a_budget_under_it(capsys):
    config = REPO / "configs" / "sd-1.5" / "baseline.yaml"
    command = ["train", "baseline", "--config", str(config), "--dry-run", "--teacher"]
    unet = str(REPO / "configs" / "unets" / "sd-1.5")
    assert main([*command, unet]) == 0
    floor = float(re.search(r"L1 pruning's cheapest network costs (0\.\d+)\)", capsys.readouterr().out).group(1))
    assert 0.05 < floor < 0.6
    under = f"{floor - 0.01:.4f}"
    assert main([*command, unet, "--set", f"budget={under}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aptp train baseline: error: budget: {under} is below {floor:.4f} of the teacher's MACs")


def test_a_search_plan_states_what_the_width_floor_costs_and_refuses_a_target_under_it(capsys):
    config = REPO / "configs" / "sd-1.5" / "search.yaml"
    command = ["train", "search", "--config", str(config), "--dry-run", "--teacher"]
    unet = str(REPO / "configs" / "unets" / "sd-1.5")
    widths_only = ["--set", "prune_depth=false", "--set", "min_width=0.25"]
    assert main([*command, unet, *widths_only]) == 0
    floor = float(re.search(r"width floor 0.25 \(no code under (0\.\d+) of the teacher", capsys.readouterr().out)[1])
    assert 0.25 < floor < 0.6
    under = round(floor - 0.01, 3)
    assert main([*command, unet, *widths_only, "--set", f"budget={under}"]) == 2
    assert f"error: budget: [{under}] below {floor:.3f} of the teacher's MACs" in capsys.readouterr().err


@pytest.mark.parametrize("job", ["search", "baseline"])
def test_a_plan_of_a_teacher_that_is_not_there_names_it(job, tmp_path, capsys):
    config = REPO / "configs" / "shapes" / f"{job}.yaml"
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for teacher in (missing, empty):
        assert main(["train", job, "--config", str(config), "--dry-run", "--teacher", str(teacher)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"aptp train {job}: error: teacher: {teacher}"), err
