"""benchmarks/binding.py: where tier-3 alignment goes (drawing vs binding errors), and the text-side read-out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.binding import main, object_outcomes, readout_accuracy
from training.data.shapes import Sample, Scene, SceneObject
from training.evaluation.evaluator import Reading


def _reading(cells: dict[int, tuple[str, str]]) -> Reading:
    shapes = [cells[c][0] if c in cells else None for c in range(9)]
    colours = [cells[c][1] if c in cells else "red" for c in range(9)]
    return Reading("white", shapes, colours, ["small"] * 9, np.zeros(9), None, "red")


def _sample(*objects: SceneObject) -> Sample:
    return Sample(np.zeros((32, 32, 3), np.uint8), "caption", Scene(3, "white", list(objects)))


def test_swapped_attributes_count_as_binding_errors_and_missing_objects_as_not_drawn():
    red_circle, blue_square = SceneObject("circle", "red", "small", 0), SceneObject("square", "blue", "small", 8)
    swapped = _reading({0: ("square", "blue"), 8: ("circle", "red")})
    half_missing = _reading({0: ("circle", "green")})  # right shape, a colour no object asked for; cell 8 empty
    outcomes = object_outcomes([_sample(red_circle, blue_square)] * 2, [swapped, half_missing])
    assert outcomes["objects"] == 4
    assert outcomes["drawn_at_cell"] == pytest.approx(3 / 4)
    assert outcomes["shape_right_when_drawn"] == pytest.approx(1 / 3)
    assert outcomes["colour_right_when_drawn"] == 0
    assert outcomes["both_right"] == 0
    assert outcomes["wrong_shape_from_another_object"] == 1.0  # both wrong shapes were the other object's
    assert outcomes["wrong_colour_from_another_object"] == pytest.approx(2 / 3)  # green belongs to no object


def test_readout_reports_accuracy_per_adapter_depth(prompt_encoder):
    accuracy = readout_accuracy(prompt_encoder, (0, 1), train=64, test=32, steps=3, seed=0)
    assert set(accuracy) == {"adapter_layers_0", "adapter_layers_1"}
    for result in accuracy.values():
        assert 0.0 <= result["shape_accuracy"] <= 1.0 and 0.0 <= result["colour_accuracy"] <= 1.0


def test_bad_adapter_depths_and_missing_bundles_exit_2_naming_them(tmp_path, capsys):
    assert main(["--bundle", "x", "--name", "n", "--adapter-layers", "0,two", "--out", str(tmp_path)]) == 2
    assert "--adapter-layers '0,two'" in capsys.readouterr().err
    missing = tmp_path / "no-such-bundle"
    assert main(["--bundle", str(missing), "--name", "n", "--out", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not list(tmp_path.glob("n.*"))


def test_report_on_a_tiny_teacher(tmp_path, capsys):
    from tests.helpers import save_tiny_teacher

    teacher = save_tiny_teacher(tmp_path / "teacher")
    torch.manual_seed(0)
    args = ["--bundle", str(teacher), "--name", "tiny", "--out", str(tmp_path), "--prompts", "4"]
    assert main([*args, "--train", "64", "--test", "32", "--steps", "2"]) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert report["objects"]["real"]["objects"] >= 8  # 4 tier-3 prompts hold 2-3 objects each
    assert report["objects"]["real"]["both_right"] > 0.9  # the evaluator reads real scenes
    assert "| generated |" in (tmp_path / "tiny.md").read_text()


def test_part_one_alone_on_a_teacher_with_an_adapter(tmp_path):
    """`--adapter-layers ''` compares models' images only (no text-side read-out), whatever the teacher reads."""
    from tests.helpers import save_tiny_teacher

    teacher = save_tiny_teacher(tmp_path / "teacher", adapter_width=16, summary_tokens=3)
    args = ["--bundle", str(teacher), "--name", "tiny", "--out", str(tmp_path), "--prompts", "2"]
    assert main([*args, "--adapter-layers", ""]) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert report["readout"]["accuracy"] == {} and report["objects"]["generated"]["objects"] >= 4
    assert "attention read per cell" not in (tmp_path / "tiny.md").read_text()
