"""Evaluation metrics: CMMD's MMD estimator, prompt alignment from evaluator readings, and evaluator files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.labels import BACKGROUND_NAMES, COLOUR_NAMES, HEADS, PER_CELL_HEADS, collate
from training.data.shapes import CELLS, DEFAULT_CELL, GLYPHS, SHAPES, SIZES, Scene, SceneObject, ShapesDomain
from training.evaluation.evaluator import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    DomainEvaluator,
    EvaluatorConfig,
    Reading,
    alignment,
    read_images,
)
from training.evaluation.metrics import median_bandwidth, mmd_rbf, paired_difference
from training.evaluation.reports import routing_summary

EMPTY = [None] * len(CELLS)


# ------------------------------------------------------------------------------------------------------------ MMD
def test_mmd_is_near_zero_for_the_same_distribution_and_large_for_shifted_ones():
    generator = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(300, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    sigma = median_bandwidth(x)
    same = mmd_rbf(x, y, sigma)
    shifted = mmd_rbf(x, z + 0.5, sigma)
    far = mmd_rbf(x, z + 2.0, sigma)
    assert abs(same) < 5, same
    assert shifted > 20 * max(abs(same), 0.1), (same, shifted)
    assert far > shifted
    assert mmd_rbf(y, x, sigma) == pytest.approx(same, abs=1e-9)


def test_median_bandwidth_is_the_median_pairwise_distance():
    points = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 2, 3 (each twice)
    assert median_bandwidth(points) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------------ alignment
def _reading(cells: dict[int, tuple[str, str, str]] | None = None, background="black", glyph=None, glyph_colour="red"):
    """A reading with objects `{cell: (shape, colour, size)}`; occupancy 0.9 at object cells, 0.05 elsewhere."""
    cells = cells or {}
    shape = [cells[c][0] if c in cells else None for c in range(len(CELLS))]
    colour = [cells[c][1] if c in cells else "green" for c in range(len(CELLS))]
    size = [cells[c][2] if c in cells else "small" for c in range(len(CELLS))]
    occupied = np.array([0.9 if c in cells else 0.05 for c in range(len(CELLS))])
    return Reading(background, shape, colour, size, occupied, glyph, glyph_colour)


def _scene(checks: list[tuple]) -> Scene:
    return Scene(tier=3, background="black", mentioned=checks)


def test_full_marks_when_everything_matches():
    checks = [("shape", 0, "circle"), ("colour", 0, "red"), ("shape", 8, "cross"), ("colour", 8, "blue")]
    checks += [("background", "white")]
    reading = _reading({0: ("circle", "red", "small"), 8: ("cross", "blue", "small")}, background="white")
    assert alignment(_scene(checks), reading) == 1.0


def test_one_failed_check_of_two_gives_half():
    checks = [("shape", 4, "square"), ("colour", 4, "red")]
    assert alignment(_scene(checks), _reading({4: ("square", "blue", "large")})) == 0.5
    assert alignment(_scene(checks), _reading({4: ("circle", "red", "large")})) == 0.5


def test_shares_count_every_kind_of_check():
    checks = [("shape", 2, "diamond"), ("colour", 2, "cyan"), ("size", 2, "large"), ("background", "sand")]
    reading = _reading({2: ("diamond", "cyan", "small")}, background="gray")  # size and background wrong
    assert alignment(_scene(checks), reading) == 0.5


def test_unplaced_object_is_looked_for_in_the_most_occupied_cell():
    checks = [("shape", None, "triangle"), ("colour", None, "orange")]
    reading = _reading({7: ("triangle", "orange", "large"), 1: ("circle", "red", "small")})
    reading.occupied[1] = 0.6  # cell 7 (0.9) is the most likely to hold an object
    assert alignment(_scene(checks), reading) == 1.0
    reading.occupied[1] = 0.95  # now cell 1 is, and it holds a red circle
    assert alignment(_scene(checks), reading) == 0.0


def test_a_cell_read_as_empty_fails_its_checks():
    checks = [("shape", 3, "circle"), ("colour", 3, "green"), ("size", 3, "small"), ("background", "black")]
    reading = _reading({5: ("circle", "green", "small")})  # the object is in another cell; cell 3 reads empty
    assert reading.cell_colour[3] == "green" and reading.cell_size[3] == "small"  # would match if not empty
    assert alignment(_scene(checks), reading) == 0.25


def test_glyph_checks():
    checks = [("glyph", "K"), ("glyph_colour", "purple")]
    assert alignment(_scene(checks), _reading(glyph="K", glyph_colour="purple")) == 1.0
    assert alignment(_scene(checks), _reading(glyph="X", glyph_colour="purple")) == 0.5
    # a glyph colour is only credited when a glyph is read at all
    assert alignment(_scene(checks), _reading(glyph=None, glyph_colour="purple")) == 0.0


def _oracle_reading(scene: Scene) -> Reading:
    """What a perfect evaluator would read from the scene's image."""
    cells = {o.cell: (o.shape, o.colour, o.size) for o in scene.objects}
    return _reading(cells, scene.background, scene.glyph, scene.glyph_colour or "red")


def test_a_perfect_reading_gets_full_marks_on_every_domain_sample():
    for split in ("test", "heldout"):
        for sample in ShapesDomain(seed=3, split=split).batch(0, 150):
            assert alignment(sample.scene, _oracle_reading(sample.scene)) == 1.0, sample.caption


# ---------------------------------------------------------------------------------------------------- read_images
class _FixedLogits(torch.nn.Module):
    """Logits that read as: white background, a large red circle in the centre cell, no glyph."""

    def forward(self, images):
        n = len(images)
        out = {k: torch.zeros(n, len(CELLS), c) if k in PER_CELL_HEADS else torch.zeros(n, c) for k, c in HEADS.items()}
        out["background"][:, BACKGROUND_NAMES.index("white")] = 5
        out["cell_shape"][:, :, 0] = 5
        out["cell_shape"][:, DEFAULT_CELL, 0] = 0
        out["cell_shape"][:, DEFAULT_CELL, 1 + SHAPES.index("circle")] = 5
        out["cell_colour"][:, DEFAULT_CELL, COLOUR_NAMES.index("red")] = 5
        out["cell_size"][:, DEFAULT_CELL, SIZES.index("large")] = 5
        out["glyph"][:, 0] = 5
        return out


def test_read_images_decodes_every_head():
    readings = read_images(_FixedLogits(), torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert len(readings) == 3
    reading = readings[0]
    assert reading.background == "white"
    assert reading.cell_shape == [None] * DEFAULT_CELL + ["circle"] + [None] * (len(CELLS) - DEFAULT_CELL - 1)
    assert reading.cell_colour[DEFAULT_CELL] == "red" and reading.cell_size[DEFAULT_CELL] == "large"
    assert reading.glyph is None
    assert int(np.argmax(reading.occupied)) == DEFAULT_CELL and reading.occupied[DEFAULT_CELL] > 0.9
    scene = Scene(1, "black", [SceneObject("circle", "red", "large", DEFAULT_CELL)])
    scene.mentioned = [("shape", None, "circle"), ("colour", None, "red"), ("background", "white")]
    assert alignment(scene, reading) == 1.0


def test_read_images_with_a_real_evaluator_returns_valid_names():
    torch.manual_seed(0)
    model = DomainEvaluator(EvaluatorConfig(width=8, feature_dim=32)).eval()
    images, _ = collate(ShapesDomain(seed=0).batch(0, 4))
    for reading in read_images(model, images):
        assert reading.background in BACKGROUND_NAMES
        assert all(s is None or s in SHAPES for s in reading.cell_shape)
        assert reading.glyph is None or reading.glyph in GLYPHS
        assert reading.occupied.shape == (len(CELLS),) and np.all((reading.occupied >= 0) & (reading.occupied <= 1))


# -------------------------------------------------------------------------------------------------- evaluator files
def _evaluator(config: EvaluatorConfig | None = None) -> DomainEvaluator:
    """A randomly initialised evaluator whose BatchNorm running statistics are not the defaults."""
    torch.manual_seed(0)
    model = DomainEvaluator(config)
    images, _ = collate(ShapesDomain(seed=0).batch(0, 8))
    model.train()
    with torch.no_grad():
        model(images.float() / 127.5 - 1)
    return model.eval()


@pytest.mark.parametrize("config", [None, EvaluatorConfig(width=8, feature_dim=32)])
def test_save_load_round_trip_gives_identical_logits(tmp_path, config):
    model = _evaluator(config)
    model.save(tmp_path / "evaluator")
    loaded = DomainEvaluator.load(tmp_path / "evaluator")
    assert loaded.config == model.config and not loaded.training
    images, _ = collate(ShapesDomain(seed=1).batch(0, 4))
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        expected, actual = model(x), loaded(x)
    assert expected.keys() == actual.keys() == HEADS.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    with torch.no_grad():
        assert torch.equal(loaded.features(x), model.features(x))


def test_load_a_missing_folder_raises_value_error_naming_it(tmp_path):
    missing = tmp_path / "no-evaluator"
    with pytest.raises(ValueError, match=str(missing)):
        DomainEvaluator.load(missing)


def test_load_a_folder_with_invalid_config_raises_value_error_naming_it(tmp_path):
    _evaluator(EvaluatorConfig(width=8, feature_dim=32)).save(tmp_path / "evaluator")
    (tmp_path / "evaluator" / CONFIG_NAME).write_text('{"width": 8, "depth": 3}')
    with pytest.raises(ValueError, match=str(tmp_path / "evaluator")):
        DomainEvaluator.load(tmp_path / "evaluator")


def test_load_corrupt_weights_raises_value_error_naming_the_folder(tmp_path):
    _evaluator(EvaluatorConfig(width=8, feature_dim=32)).save(tmp_path / "evaluator")
    (tmp_path / "evaluator" / WEIGHTS_NAME).write_bytes(b"corrupt" * 8)
    with pytest.raises(ValueError, match=str(tmp_path / "evaluator")):
        DomainEvaluator.load(tmp_path / "evaluator")


def test_routing_summary_shares_and_macs_per_tier():
    codes = [0, 1, 1, 0, 1, 2]
    tiers = np.array([1, 1, 3, 4, 3, 2])
    summary = routing_summary(codes, code_macs=[50, 100, 80], teacher_macs=200, tiers=tiers)
    assert summary["num_codes"] == 3
    assert summary["load"] == pytest.approx({"0": 2 / 6, "1": 3 / 6, "2": 1 / 6})
    ratio = summary["macs_ratio"]
    assert ratio["overall"] == pytest.approx((50 + 100 + 100 + 50 + 100 + 80) / 6 / 200)
    assert ratio["tier1"] == pytest.approx(0.375) and ratio["tier3"] == pytest.approx(0.5)
    assert ratio["tier4"] == pytest.approx(0.25) and ratio["tier2"] == pytest.approx(0.4)
    assert summary["macs_ratio_tiers_3_4"] == pytest.approx((100 + 50 + 100) / 3 / 200)
    assert summary["code_macs_ratio"] == pytest.approx([0.25, 0.5, 0.4])
    assert routing_summary([0], [50], 200, np.array([1]))["macs_ratio_tiers_3_4"] is None


def test_paired_difference_of_identical_and_shifted_scores():
    scores = np.random.default_rng(0).random(300)
    assert paired_difference(scores, scores) == {"mean": 0.0, "low": 0.0, "high": 0.0}
    shifted = paired_difference(scores + 0.1, scores)
    assert shifted["mean"] == pytest.approx(0.1) and shifted["low"] == pytest.approx(0.1)
    assert shifted["high"] == pytest.approx(0.1)


def test_paired_difference_interval_narrows_with_more_prompts_and_covers_the_mean():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1600):
        reference = rng.random(n)
        values = np.clip(reference + rng.normal(0.02, 0.1, n), 0, 1)
        d = paired_difference(values, reference)
        assert d["low"] < d["mean"] < d["high"]
        widths.append(d["high"] - d["low"])
    assert widths[1] < widths[0] / 2  # about 1/sqrt(16) as wide
