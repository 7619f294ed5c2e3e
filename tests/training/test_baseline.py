"""`aptp train baseline` on a tiny teacher: static L1-norm pruning to the MAC budget (the most important gates
of every unit kept), fine-tuned and exported as a one-code bundle."""

from __future__ import annotations

import pytest

import aptp.conditioning.conditioner as conditioner_module
from aptp.formats.bundle import read_manifest
from aptp.formats.teacher import load_teacher
from tests.helpers import save_tiny_teacher, shared_encoder_factory
from training.baseline import BaselineConfig, run_baseline


@pytest.fixture(autouse=True)
def shared_encoder(monkeypatch, prompt_encoder):
    monkeypatch.setattr(conditioner_module, "PromptEncoder", shared_encoder_factory(prompt_encoder))


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("baseline") / "teacher", seed=4)


def _baseline(teacher_folder, folder, budget: float):
    config = BaselineConfig.model_validate(
        {
            "teacher": str(teacher_folder),
            "out": str(folder / "run"),
            "export": str(folder / "bundle"),
            "budget": budget,
            "training_prompts": 16,
            "expert": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
            "export_dtype": "float32",
        }
    )
    return read_manifest(run_baseline(config))


def test_baseline_bundles_meet_their_budgets(teacher_folder, tmp_path):
    ratios = {}
    for budget in (0.6, 0.9):
        manifest = _baseline(teacher_folder, tmp_path / str(budget), budget)
        (code,) = manifest.codes
        assert code.training_share == 1.0
        assert manifest.info["stage"] == "static-l1-baseline"
        ratios[budget] = code.macs / manifest.teacher_macs
        assert ratios[budget] <= budget
    assert ratios[0.6] < ratios[0.9]  # the larger budget keeps more (the tiny teacher's width steps are coarse)


def test_a_baseline_of_a_teacher_with_a_text_adapter_carries_it(tmp_path):
    """Distilled through the adapter's states and its prompt map, like every expert of such a teacher."""
    from aptp.pipeline import RoutedPipeline

    teacher_folder = save_tiny_teacher(tmp_path / "teacher", seed=4, adapter_width=16, summary_tokens=5, map_channels=4)
    manifest = _baseline(teacher_folder, tmp_path, 0.6)
    assert manifest.text_adapter == load_teacher(teacher_folder)[1].text_adapter
    pipeline = RoutedPipeline.load(tmp_path / "bundle")
    made = pipeline.run(["a red circle in the top left and a blue square"], seeds=[0], steps=2)
    assert made.images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_budget_under_what_l1_pruning_reaches_is_refused_by_the_cli_before_training(
    teacher_folder, tmp_path, capsys, dry_run
):
    from aptp.cli.main import main
    from tests.helpers import REPO

    command = ["train", "baseline", "--config", str(REPO / "configs/shapes/baseline.yaml"), "--teacher"]
    paths = [str(teacher_folder), "--out", str(tmp_path / "run"), "--export", str(tmp_path / "bundle")]
    assert main([*command, *paths, "--set", "budget=0.01", *dry_run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aptp train baseline: error: budget: 0.01 is below 0.") and "cheapest network" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "bundle").exists()
