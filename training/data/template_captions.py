"""The shapes domain's first caption generator, kept as it was: the captions the shipped models were trained and
evaluated on (`ShapesDomain(phrasing="templates")`), so their reports stay reproducible prompt for prompt. New
training uses the richer generator of `training.data.shapes` (`phrasing="rich"`), whose words and frames include
all of these.
"""

from __future__ import annotations

import numpy as np

from .shapes import Scene, SceneObject, _article, _pick

SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc", "round dot"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "triangle shape"),
    "diamond": ("diamond", "diamond", "rhombus"),
    "cross": ("cross", "cross", "plus sign", "plus"),
}
COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "cyan": ("cyan", "turquoise"),
}
BACKGROUND_WORDS = {
    "black": ("black", "dark"),
    "white": ("white",),
    "gray": ("gray", "grey"),
    "sand": ("sand", "beige"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
CELL_PHRASES = (
    ("in the top left corner", "at the top left", "in the upper left"),
    ("at the top", "at the top center", "in the upper middle"),
    ("in the top right corner", "at the top right", "in the upper right"),
    ("on the left", "at the left side", "in the middle left"),
    ("in the center", "in the middle", "at the centre"),
    ("on the right", "at the right side", "in the middle right"),
    ("in the bottom left corner", "at the bottom left", "in the lower left"),
    ("at the bottom", "at the bottom center", "in the lower middle"),
    ("in the bottom right corner", "at the bottom right", "in the lower right"),
)
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "draw ", "show ", "a simple icon of ")
GLYPH_PREFIXES = ("", "", "write ", "an image of ", "a picture of ")


def _object_phrase(rng, obj: SceneObject, with_size: bool, with_cell: bool, location_first: bool = True) -> str:
    colour = _pick(rng, COLOUR_WORDS[obj.colour])
    shape = _pick(rng, SHAPE_WORDS[obj.shape])
    size = _pick(rng, SIZE_WORDS[obj.size]) if with_size else None
    where = _pick(rng, CELL_PHRASES[obj.cell]) if with_cell else None
    style = int(rng.integers(4 if location_first else 3))
    if style == 0 or (style == 3 and where is None):
        words = [w for w in (size, colour, shape) if w]
        phrase = f"{_article(words[0])} {' '.join(words)}"
    elif style == 1:
        words = [w for w in (size, colour, shape) if w]
        phrase = " ".join(words)
    elif style == 2:
        noun = " ".join(w for w in (size, shape) if w)
        link = "that is" if rng.random() < 0.5 else "in"
        phrase = f"{_article(noun)} {noun} {link} {colour}"
    else:
        noun = " ".join(w for w in (size, colour, shape) if w)
        return f"{where}, {_article(noun)} {noun}"
    return f"{phrase} {where}" if where else phrase


def _background_phrase(rng, background: str) -> str:
    word = _pick(rng, BACKGROUND_WORDS[background])
    return _pick(
        rng, (f"on a {word} background", f"on {word}", f"against a {word} backdrop", f"with a {word} background")
    )


def template_caption(rng: np.random.Generator, scene: Scene) -> str:
    background_named = any(c[0] == "background" for c in scene.mentioned)
    if scene.glyph is not None:
        colour = _pick(rng, COLOUR_WORDS[scene.glyph_colour])
        kind = "digit" if scene.glyph.isdigit() else "letter"
        kind = _pick(rng, (kind, kind, "character", "symbol" if kind == "digit" else "capital letter"))
        text = _pick(
            rng,
            (
                f"the {kind} {scene.glyph} in {colour}",
                f"{_article(colour)} {colour} {kind} {scene.glyph}",
                f"{_article(colour)} {colour} {scene.glyph}",
                f"the {kind} {scene.glyph} written in {colour}",
                f"{scene.glyph} in {colour}",
                f"the {kind} {scene.glyph}, colored {colour}",
            ),
        )
        text = _pick(rng, GLYPH_PREFIXES) + text
    elif scene.tier in (1, 2):
        obj = scene.objects[0]
        with_size = any(c[0] == "size" for c in scene.mentioned)
        with_cell = any(c[0] == "shape" and c[1] is not None for c in scene.mentioned)
        prefix = _pick(rng, PREFIXES)
        text = prefix + _object_phrase(rng, obj, with_size, with_cell, location_first=not prefix)
    else:
        order = rng.permutation(len(scene.objects))
        prefix = _pick(rng, ("", "", "", "there is ", "a scene with ", "draw "))
        parts = [
            _object_phrase(rng, scene.objects[i], False, True, location_first=k > 0 or not prefix)
            for k, i in enumerate(order)
        ]
        joined = ", ".join(parts[:-1]) + _pick(rng, (" and ", ", ", " and also ")) + parts[-1]
        text = prefix + joined
    if background_named:
        bg = _background_phrase(rng, scene.background)
        text = f"{bg}, {text}" if rng.random() < 0.25 else f"{text} {bg}"
    return " ".join(text.split())
