"""A local image-caption folder as training data: read at the training resolution, in a seeded order that a resumed
run repeats exactly, with bad entries refused or skipped by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from training.data.captions import (
    CaptionFolder,
    CaptionFolderConfig,
    DatasetError,
    ShapesData,
    read_prompt_file,
    training_data,
)


def _open(folder, resolution=16, seed=0, **settings) -> CaptionFolder:
    return CaptionFolder(CaptionFolderConfig(folder=str(folder), **settings), resolution, seed)


def test_images_come_at_the_training_resolution_with_their_captions(tiny_captions):
    data = _open(tiny_captions)
    assert len(data) == 12
    images, captions = data.take([0, 1, 2])
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    metadata = [json.loads(line) for line in (tiny_captions / "metadata.jsonl").read_text().splitlines()]
    texts = {entry["text"] for entry in metadata}
    assert set(captions) <= texts and data.captions([0, 1, 2]) == captions


def test_the_order_is_a_seeded_permutation_per_epoch_and_a_position_is_always_the_same_sample(tiny_captions):
    data = _open(tiny_captions, seed=3)
    first_epoch = [data.index(p) for p in range(12)]
    assert sorted(first_epoch) == list(range(12))  # every entry once per epoch
    assert [data.index(p) for p in range(12, 24)] != first_epoch  # a new order next epoch
    assert [_open(tiny_captions, seed=4).index(p) for p in range(12)] != first_epoch
    # What a run sees at step s does not depend on the steps before it: a resumed run sees the same images.
    later, _ = data.take(range(20, 24))
    assert torch.equal(_open(tiny_captions, seed=3).take(range(20, 24))[0], later)


def test_random_crops_and_flips_are_drawn_per_position(tiny_captions):
    plain = _open(tiny_captions, seed=1)
    varied = _open(tiny_captions, seed=1, center_crop=False, random_flip=True)
    again = _open(tiny_captions, seed=1, center_crop=False, random_flip=True)
    assert torch.equal(varied.take(range(8))[0], again.take(range(8))[0])
    assert not torch.equal(varied.take(range(8))[0], plain.take(range(8))[0])


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda lines: lines.__setitem__(2, json.dumps({"file_name": "images/002.jpg", "text": " "})), "no caption"),
        (lambda lines: lines.__setitem__(3, json.dumps({"file_name": "images/gone.png", "text": "x"})), "missing"),
        (lambda lines: lines.__setitem__(4, "{not json"), "not valid JSON"),
        (lambda lines: lines.__setitem__(5, json.dumps({"text": "no file"})), "no file_name"),
    ],
    ids=["no-caption", "absent-file", "bad-json", "no-file-name"],
)
def test_a_bad_entry_is_refused_by_name_or_skipped(tiny_captions, tmp_path, edit, says):
    folder = shutil.copytree(tiny_captions, tmp_path / "data")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    edit(lines)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=says) as error:
        _open(folder)
    assert "metadata.jsonl:" in str(error.value) and "on_error: skip" in str(error.value)
    skipping = _open(folder, on_error="skip")
    assert len(skipping) == 11 and len(skipping.skipped) == 1 and says in skipping.skipped[0]


def test_an_image_that_does_not_decode_is_named(tiny_captions, tmp_path):
    folder = shutil.copytree(tiny_captions, tmp_path / "data")
    (folder / "images" / "001.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="001.png: not a readable image"):
        _open(folder)


def test_a_folder_without_metadata_and_an_empty_prompt_file_are_named(tmp_path):
    with pytest.raises(DatasetError, match="metadata.jsonl: file not found"):
        _open(tmp_path)
    (tmp_path / "prompts.txt").write_text("# a comment\n\n")
    with pytest.raises(DatasetError, match="prompts.txt: no prompts"):
        read_prompt_file(tmp_path / "prompts.txt")
    (tmp_path / "prompts.txt").write_text("a red bicycle\n# skipped\nthe letter K\n")
    assert read_prompt_file(tmp_path / "prompts.txt") == ["a red bicycle", "the letter K"]


def test_without_a_folder_the_embedded_domain_is_the_data():
    data = training_data(None, 32, seed=1)
    assert isinstance(data, ShapesData)
    images, captions = data.take([0, 1])
    assert images.shape == (2, 3, 32, 32) and len(captions) == 2


def test_the_shapes_data_speaks_the_phrasing_its_teacher_learned():
    """A run on the shipped teacher (`phrasing: templates`) draws the first templates' captions; a run on a teacher
    of the rich generator draws those: the same scenes, other words."""
    from training.data.captions import training_data
    from training.data.shapes import ShapesDomain

    templates = training_data(None, 32, seed=4, phrasing="templates").captions(range(40))
    rich = training_data(None, 32, seed=4).captions(range(40))
    assert templates == [ShapesDomain(4, "train", phrasing="templates").caption(i) for i in range(40)]
    assert rich == [ShapesDomain(4, "train").caption(i) for i in range(40)] and rich != templates
