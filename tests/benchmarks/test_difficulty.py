"""benchmarks/difficulty.py: candidate difficulty targets of the search, measured per tier before a search runs."""

from __future__ import annotations

import json

import torch

from benchmarks.difficulty import TARGETS, candidate_errors, main
from router.difficulty import reference_error
from tests.helpers import save_tiny_teacher


def test_targets_relative_to_the_prompts_effect_do_not_grow_with_the_area_it_acts_on():
    """One large object against a small one: the same per-pixel miss gives four times the output error on four times
    the area, and the same relative, effect and direction errors, since the prompt's effect covers that area too."""
    empty = torch.zeros(2, 3, 8, 8)
    teacher = empty.clone()
    teacher[0, :, :4, :4] = 1.0  # the prompt acts on a quarter of the image
    teacher[1, :, :2, :2] = 1.0  # on a sixteenth
    reference = teacher * 0.5  # misses half of it, in the right direction
    errors = candidate_errors(reference, teacher, empty, empty)
    assert set(errors) == set(TARGETS)
    torch.testing.assert_close(errors["output"], reference_error(reference, teacher))
    torch.testing.assert_close(errors["output"][0] / errors["output"][1], torch.tensor(4.0))
    torch.testing.assert_close(errors["relative"], torch.full((2,), 0.25))
    torch.testing.assert_close(errors["effect"], torch.full((2,), 0.25))
    torch.testing.assert_close(errors["direction"], torch.zeros(2), atol=1e-6, rtol=0)

    # an effect drawn in the wrong place: as large, pointing elsewhere
    elsewhere = empty.clone()
    elsewhere[:, :, 4:, 4:] = 1.0
    wrong = candidate_errors(elsewhere, teacher, empty, empty)
    assert (wrong["direction"] > 0.99).all() and (wrong["effect"] > errors["effect"]).all()


def test_a_run_on_a_tiny_teacher_reports_every_target_for_every_tier_and_phrasing(tmp_path, capsys):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    args = ["--teacher", str(teacher), "--per-tier", "2", "--batch", "5", "--budget", "0.5"]
    assert main([*args, "--name", "tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert set(report["targets"]) == set(TARGETS)
    for table in report["targets"].values():
        assert set(table) == {"rich", "templates"}
        for tiers in table.values():
            assert set(tiers) == {"1", "2", "3", "4"}
            assert all(abs(v) < 50 for v in tiers.values())  # centred logs, finite
    assert "| direction | templates |" in (tmp_path / "tiny.md").read_text()
    assert torch.is_grad_enabled()
