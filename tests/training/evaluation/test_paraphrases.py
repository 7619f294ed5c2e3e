"""The held-out paraphrase set: labelled, written by its grammar, and phrased in words that training never sees."""

from __future__ import annotations

import json
import re

import pytest

from training.data.captions import ShapesData
from training.data.shapes import CELLS, COLOURS, SHAPES
from training.evaluation.paraphrases import (
    PARAPHRASE_FILE,
    PER_TIER,
    distinctive_phrases,
    load_paraphrases,
    write_records,
)

TRAINING_CAPTIONS = 20_000


@pytest.fixture(scope="module")
def training_captions() -> list[str]:
    return ShapesData(seed=0).captions(range(TRAINING_CAPTIONS))


def test_the_committed_set_is_what_the_grammar_writes():
    committed = [json.loads(line) for line in PARAPHRASE_FILE.read_text().splitlines()]
    assert committed == write_records()


def test_the_set_has_every_tier_labelled():
    samples = load_paraphrases()
    assert len(samples) >= 400
    for tier in range(1, 5):
        assert sum(s.scene.tier == tier for s in samples) == PER_TIER
    for sample in samples:
        assert sample.scene.mentioned, sample.caption
        assert sample.image.shape == (32, 32, 3)
        for check in sample.scene.mentioned:
            if check[0] in ("shape", "colour") and check[1] is not None:
                # An object check names a cell that holds that object.
                held = [o for o in sample.scene.objects if o.cell == check[1]]
                assert held and getattr(held[0], check[0]) == check[2], (sample.caption, check)


def test_prompts_name_what_they_check():
    """Every checked shape and colour is in its prompt, in the grammar's words for it."""
    from training.evaluation.paraphrases import COLOURS as COLOUR_WORDS
    from training.evaluation.paraphrases import SHAPES as SHAPE_WORDS

    for sample in load_paraphrases():
        for check in sample.scene.mentioned:
            if check[0] == "shape":
                assert any(w in sample.caption for w in SHAPE_WORDS[check[2]]), (sample.caption, check)
            if check[0] in ("colour", "glyph_colour"):
                name = check[-1]
                assert any(w in sample.caption for w in COLOUR_WORDS[name]), (sample.caption, check)


def test_no_training_caption_uses_a_phrase_of_the_set(training_captions):
    phrases = distinctive_phrases()
    assert len(phrases) > 80
    joined = "\n".join(training_captions)
    for phrase in phrases:
        pattern = r"(?<![a-z])" + re.escape(phrase) + r"(?![a-z])"
        assert not re.search(pattern, joined), phrase


def test_no_prompt_of_the_set_is_a_training_caption(training_captions):
    seen = set(training_captions)
    assert not [s.caption for s in load_paraphrases() if s.caption in seen]


def test_images_are_drawn_again_with_another_seed():
    """The real-vs-real floor compares the set's images with the same scenes drawn again (other jitter)."""
    first, again = load_paraphrases(image_seed=0)[:20], load_paraphrases(image_seed=1)[:20]
    assert [s.caption for s in first] == [s.caption for s in again]
    assert any((a.image != b.image).any() for a, b in zip(first, again, strict=True))


def test_a_malformed_line_is_refused_naming_it(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(PARAPHRASE_FILE.read_text().splitlines()[0] + "\n" + '{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"set.jsonl, line 2"):
        load_paraphrases(path)


def test_scene_tables_agree_with_the_domain():
    from training.evaluation import paraphrases

    assert set(paraphrases.SHAPES) == set(SHAPES)
    assert set(paraphrases.COLOURS) == set(COLOURS)
    assert len(paraphrases.PLACES) == len(CELLS)
