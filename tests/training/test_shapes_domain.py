"""The embedded shapes domain: deterministic scenes, images that show what the scene says, captions that name what
the checks ask for, held-out combinations kept out of training, and labels consistent with the scenes."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from aptp.decoding import to_uint8
from training.data.labels import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    HEADS,
    IGNORE,
    collate,
    images_to_unit_range,
    scene_targets,
)
from training.data.shapes import (
    BACKGROUND_WORDS,
    BACKGROUNDS,
    CELL_PHRASES,
    CELLS,
    COLOUR_WORDS,
    COLOURS,
    DEFAULT_BACKGROUND,
    DEFAULT_CELL,
    GLYPHS,
    GRID,
    HELD_OUT_GLYPHS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    RELATION_PHRASES,
    SHAPE_PLURALS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    SPLITS,
    TIER_WEIGHTS,
    Sample,
    ShapesDomain,
    place_phrases,
)

COUNT = 300  # samples per split for the distributional checks
# Measured over 1800 samples (3 splits x 600): the pixel at a large object's cell centre is at most 35 (L1 over
# RGB) from its nominal colour (the renderer jitters each channel by up to 12), and a corner pixel with no object
# in its cell at most 18 from the background colour (jitter up to 6 per channel).
OBJECT_TOLERANCE = 48
BACKGROUND_TOLERANCE = 24
CORNERS = {0: (0, 0), 2: (0, IMAGE_SIZE - 1), 6: (IMAGE_SIZE - 1, 0), 8: (IMAGE_SIZE - 1, IMAGE_SIZE - 1)}


@pytest.fixture(scope="module")
def samples() -> dict[str, list[Sample]]:
    return {split: ShapesDomain(seed=11, split=split).batch(0, COUNT) for split in SPLITS}


def _words(caption: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", caption)


def _names_one_of(caption: str, phrases: tuple[str, ...]) -> bool:
    padded = f" {' '.join(_words(caption.lower()))} "
    return any(f" {' '.join(_words(phrase))} " in padded for phrase in phrases)


# --------------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_split_and_index_give_the_same_sample(split):
    for index in (0, 7, 123):
        a, b = ShapesDomain(seed=5, split=split).sample(index), ShapesDomain(seed=5, split=split).sample(index)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.caption == b.caption
        assert a.scene == b.scene


def test_batch_is_the_samples_at_those_indices():
    domain = ShapesDomain(seed=5)
    batch = domain.batch(10, 3)
    for offset, sample in enumerate(batch):
        assert sample.image.tobytes() == domain.sample(10 + offset).image.tobytes()
        assert sample.caption == domain.sample(10 + offset).caption


def test_different_seeds_indices_and_splits_give_different_samples():
    base = ShapesDomain(seed=5).batch(0, 20)
    for other in (ShapesDomain(seed=6).batch(0, 20), ShapesDomain(seed=5).batch(20, 20)):
        assert sum(a.image.tobytes() != b.image.tobytes() for a, b in zip(base, other, strict=True)) >= 18
        assert sum(a.caption != b.caption for a, b in zip(base, other, strict=True)) >= 18
    # train and test share a distribution but not samples
    test = ShapesDomain(seed=5, split="test").batch(0, 20)
    assert sum(a.image.tobytes() != b.image.tobytes() for a, b in zip(base, test, strict=True)) >= 18


def test_invalid_split_raises_value_error():
    with pytest.raises(ValueError, match="split"):
        ShapesDomain(seed=0, split="validation")


# ------------------------------------------------------------------------------------------------ held-out pairs
def _held_out_combinations(sample: Sample) -> set[tuple[str, str]]:
    scene = sample.scene
    if scene.glyph is not None:
        return {(scene.glyph, scene.glyph_colour)} & HELD_OUT_GLYPHS
    return {(o.shape, o.colour) for o in scene.objects} & HELD_OUT_PAIRS


@pytest.mark.parametrize("split", ["train", "test"])
def test_train_and_test_never_use_a_held_out_combination(samples, split):
    offending = [s.caption for s in samples[split] if _held_out_combinations(s)]
    assert offending == []
    assert not any(s.scene.uses_held_out() for s in samples[split])


def test_heldout_split_always_uses_a_held_out_combination(samples):
    assert all(_held_out_combinations(s) for s in samples["heldout"])
    # and it covers both kinds (shape pairs and glyphs), so it tests more than one thing
    assert {s.scene.glyph is None for s in samples["heldout"]} == {True, False}


# ---------------------------------------------------------------------------------------------------------- tiers
@pytest.mark.parametrize("split", SPLITS)
def test_all_tiers_appear_with_roughly_the_configured_weights(samples, split):
    counts = Counter(s.scene.tier for s in samples[split])
    assert set(counts) == {1, 2, 3, 4}
    for tier, weight in enumerate(TIER_WEIGHTS, start=1):
        assert abs(counts[tier] / COUNT - weight) < 0.1, (tier, counts)


def test_custom_tier_weights_are_followed():
    domain = ShapesDomain(seed=2, tier_weights=(0, 0, 1, 1))
    assert {s.scene.tier for s in domain.batch(0, 50)} == {3, 4}


def test_tier_semantics(samples):
    for sample in samples["train"] + samples["heldout"]:
        scene, checks = sample.scene, sample.scene.mentioned
        kinds = [c[0] for c in checks]
        if scene.tier == 1:
            assert scene.glyph is None and len(scene.objects) == 1
            obj = scene.objects[0]
            assert (obj.size, obj.cell, scene.background) == ("large", DEFAULT_CELL, DEFAULT_BACKGROUND)
            assert checks == [("shape", None, obj.shape), ("colour", None, obj.colour)]
        elif scene.tier == 2:
            assert scene.glyph is None and len(scene.objects) == 1
            obj = scene.objects[0]
            assert checks[:2] in (
                [("shape", None, obj.shape), ("colour", None, obj.colour)],
                [("shape", obj.cell, obj.shape), ("colour", obj.cell, obj.colour)],
            )
            # at least one of size, position and background is named on top of shape and colour
            assert len(checks) > 2 or checks[0][1] is not None
            assert set(kinds) <= {"shape", "colour", "size", "background"}
        elif scene.tier == 3:
            assert scene.glyph is None and len(scene.objects) in (2, 3)
            cells = [o.cell for o in scene.objects]
            assert len(set(cells)) == len(cells)
            assert all(o.size == "small" for o in scene.objects)
            for obj in scene.objects:
                assert ("shape", obj.cell, obj.shape) in checks
                assert ("colour", obj.cell, obj.colour) in checks
        else:
            assert scene.tier == 4 and scene.objects == []
            assert scene.glyph in GLYPHS and scene.glyph_colour in COLOURS
            assert checks[:2] == [("glyph", scene.glyph), ("glyph_colour", scene.glyph_colour)]
            assert set(kinds[2:]) <= {"background"}
        if scene.background != DEFAULT_BACKGROUND:
            assert ("background", scene.background) in checks  # a non-default background is always named


# ----------------------------------------------------------------------------------------------------------- images
def test_image_is_32x32_rgb_uint8(samples):
    for sample in samples["train"][:20] + samples["heldout"][:20]:
        assert sample.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert sample.image.dtype == np.uint8


def _cell_centre_pixel(cell: int) -> tuple[int, int]:
    row, col = divmod(cell, GRID)
    size = IMAGE_SIZE / GRID
    return int((row + 0.5) * size), int((col + 0.5) * size)


def test_large_objects_show_their_colour_at_their_cell_centre(samples):
    checked = 0
    for sample in sum(samples.values(), []):
        for obj in sample.scene.objects:
            if obj.size != "large":
                continue
            y, x = _cell_centre_pixel(obj.cell)
            error = np.abs(sample.image[y, x].astype(int) - COLOURS[obj.colour]).sum()
            assert error < OBJECT_TOLERANCE, (sample.caption, obj, sample.image[y, x])
            checked += 1
    assert checked > 100


def test_empty_corners_show_the_background_colour(samples):
    checked = 0
    for sample in sum(samples.values(), []):
        occupied = {o.cell for o in sample.scene.objects}
        for cell, (y, x) in CORNERS.items():
            if cell in occupied:
                continue
            error = np.abs(sample.image[y, x].astype(int) - BACKGROUNDS[sample.scene.background]).sum()
            assert error < BACKGROUND_TOLERANCE, (sample.caption, cell, sample.image[y, x])
            checked += 1
    assert checked > 1000


def test_object_colour_differs_from_background_at_its_cell():
    """The test above is not vacuous: an object's cell centre is far from the background colour."""
    sample = next(s for s in ShapesDomain(seed=1).batch(0, 50) if s.scene.tier == 1)
    y, x = _cell_centre_pixel(DEFAULT_CELL)
    assert np.abs(sample.image[y, x].astype(int) - BACKGROUNDS[sample.scene.background]).sum() > 100


# --------------------------------------------------------------------------------------------------------- captions
def _shape_names(shape: str) -> tuple[str, ...]:
    """A shape's words and their plurals (two alike objects may be named once: "two red circles")."""
    words = SHAPE_WORDS[shape]
    return words + tuple(SHAPE_PLURALS.get(w, SHAPE_PLURALS.get(w.split()[-1], w + "s")) for w in words)


def _place_names(scene, cell: int) -> tuple[str, ...]:
    """The phrases that name `cell`: its own, or one placing it next to another object of the scene."""
    steps = {cell - other.cell for other in scene.objects if other.cell != cell}
    return place_phrases(cell) + sum((RELATION_PHRASES[step] for step in steps if step in RELATION_PHRASES), ())


def test_captions_name_every_checked_attribute(samples):
    for sample in sum(samples.values(), []):
        caption = sample.caption
        for check in sample.scene.mentioned:
            kind = check[0]
            if kind == "colour":
                assert _names_one_of(caption, COLOUR_WORDS[check[2]]), (caption, check)
            elif kind == "shape":
                assert _names_one_of(caption, _shape_names(check[2])), (caption, check)
                if check[1] is not None:
                    assert _names_one_of(caption, _place_names(sample.scene, check[1])), (caption, check)
            elif kind == "size":
                assert _names_one_of(caption, SIZE_WORDS[check[2]]), (caption, check)
            elif kind == "background":
                assert _names_one_of(caption, BACKGROUND_WORDS[check[1]]), (caption, check)
            elif kind == "glyph":
                assert check[1] in _words(caption), (caption, check)  # a separate token, case kept
            elif kind == "glyph_colour":
                assert _names_one_of(caption, COLOUR_WORDS[check[1]]), (caption, check)
            else:
                raise AssertionError(f"unknown check {check}")


def test_unnamed_attributes_are_not_in_the_caption(samples):
    """Tier 1 captions ask for shape and colour only: no size word, position phrase or background phrase."""
    tier1 = [s for s in samples["train"] if s.scene.tier == 1]
    assert tier1
    for sample in tier1:
        assert not _names_one_of(sample.caption, sum(SIZE_WORDS.values(), ()))
        assert not _names_one_of(sample.caption, sum(CELL_PHRASES, ()))
        assert "background" not in sample.caption


def test_captions_are_clean_single_spaced_text(samples):
    for sample in sum(samples.values(), []):
        assert sample.caption == " ".join(sample.caption.split())
        assert sample.caption


# ----------------------------------------------------------------------------------------------------------- labels
def test_scene_targets_match_the_scene(samples):
    for sample in sum(samples.values(), []):
        scene = sample.scene
        targets = scene_targets(scene)
        cells = {o.cell: o for o in scene.objects}
        for cell in range(len(CELLS)):
            if cell in cells:
                obj = cells[cell]
                assert targets["cell_shape"][cell] == 1 + SHAPES.index(obj.shape)
                assert COLOUR_NAMES[targets["cell_colour"][cell]] == obj.colour
                assert SIZES[targets["cell_size"][cell]] == obj.size
            else:
                assert targets["cell_shape"][cell] == 0
                assert targets["cell_colour"][cell] == IGNORE
                assert targets["cell_size"][cell] == IGNORE
        assert BACKGROUND_NAMES[int(targets["background"])] == scene.background
        if scene.glyph is None:
            assert int(targets["glyph"]) == 0 and int(targets["glyph_colour"]) == IGNORE
        else:
            assert GLYPHS[int(targets["glyph"]) - 1] == scene.glyph
            assert COLOUR_NAMES[int(targets["glyph_colour"])] == scene.glyph_colour


def test_collate_stacks_images_channels_first_and_labels(samples):
    batch = samples["train"][:6]
    images, targets = collate(batch)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(images[2].permute(1, 2, 0), torch.tensor(batch[2].image))
    assert set(targets) == set(HEADS)
    for name, value in targets.items():
        assert value.dtype == torch.int64 and len(value) == 6
        expected = np.stack([scene_targets(s.scene)[name] for s in batch])
        assert np.array_equal(value.numpy(), expected)
        valid = value[value != IGNORE]
        assert valid.min() >= 0 and valid.max() < HEADS[name]
    assert targets["cell_shape"].shape == (6, len(CELLS))


def test_unit_range_round_trip():
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    unit = images_to_unit_range(images)
    assert unit.min() == -1 and unit.max() == 1
    assert torch.equal(to_uint8(unit), images)
    assert torch.equal(to_uint8(torch.tensor([-5.0, 5.0])), torch.tensor([0, 255], dtype=torch.uint8))
