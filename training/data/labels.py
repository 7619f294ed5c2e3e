"""Tensor labels of the shapes domain, for training the evaluator and scoring prompt alignment."""

from __future__ import annotations

import numpy as np
import torch

from .shapes import BACKGROUNDS, CELLS, COLOURS, GLYPHS, SHAPES, SIZES, Sample, Scene

IGNORE = -100
BACKGROUND_NAMES = tuple(BACKGROUNDS)
COLOUR_NAMES = tuple(COLOURS)
# Class 0 means "nothing here" for the cell-shape and glyph heads.
HEADS = {
    "background": len(BACKGROUND_NAMES),
    "cell_shape": 1 + len(SHAPES),
    "cell_colour": len(COLOUR_NAMES),
    "cell_size": len(SIZES),
    "glyph": 1 + len(GLYPHS),
    "glyph_colour": len(COLOUR_NAMES),
}
PER_CELL_HEADS = ("cell_shape", "cell_colour", "cell_size")


def scene_targets(scene: Scene) -> dict[str, np.ndarray]:
    cell_shape = np.zeros(len(CELLS), dtype=np.int64)
    cell_colour = np.full(len(CELLS), IGNORE, dtype=np.int64)
    cell_size = np.full(len(CELLS), IGNORE, dtype=np.int64)
    for obj in scene.objects:
        cell_shape[obj.cell] = 1 + SHAPES.index(obj.shape)
        cell_colour[obj.cell] = COLOUR_NAMES.index(obj.colour)
        cell_size[obj.cell] = SIZES.index(obj.size)
    glyph = 0 if scene.glyph is None else 1 + GLYPHS.index(scene.glyph)
    glyph_colour = IGNORE if scene.glyph_colour is None else COLOUR_NAMES.index(scene.glyph_colour)
    return {
        "background": np.int64(BACKGROUND_NAMES.index(scene.background)),
        "cell_shape": cell_shape,
        "cell_colour": cell_colour,
        "cell_size": cell_size,
        "glyph": np.int64(glyph),
        "glyph_colour": np.int64(glyph_colour),
    }


def collate(samples: list[Sample]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images as uint8 `(N, 3, 32, 32)` and the label tensors of [`scene_targets`]."""
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    targets = [scene_targets(s.scene) for s in samples]
    return images, {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in HEADS}


def images_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[0, 255]` -> float `[-1, 1]` (the diffusion models' and the evaluator's input range)."""
    return images.float() / 127.5 - 1.0
