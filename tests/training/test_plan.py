"""The Stable Diffusion configs load, validate and plan against the SD-shaped U-Net configs, without weights."""

from __future__ import annotations

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
