"""The embedded default domain: small RGB scenes of coloured shapes or rendered glyphs, with varied captions and
structured labels, generated deterministically from (seed, split, index).

Difficulty tiers:
1. one object, only its colour and shape named (it is drawn large, in the centre, on black);
2. one object with its size, position and/or background named;
3. two or three small objects, each with colour, shape and grid position (and maybe the background);
4. a rendered letter or digit in a colour (and maybe the background).

Attribute combinations listed in `HELD_OUT_PAIRS` / `HELD_OUT_GLYPHS` never occur in the `train` (or `test`) split;
the `heldout` split is made of scenes that use at least one of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 32
SUPERSAMPLE = 4
GRID = 3

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 55, 185),
    "orange": (245, 135, 25),
    "cyan": (40, 205, 215),
}
BACKGROUNDS = {"black": (12, 12, 12), "white": (244, 244, 244), "gray": (128, 128, 128), "sand": (205, 180, 130)}
SIZES = ("small", "large")
SIZE_PIXELS = {"small": 7.0, "large": 12.0}
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ2345679"  # no I/1 and O/0/8 look-alikes

DEFAULT_BACKGROUND, DEFAULT_SIZE, DEFAULT_CELL = "black", "large", CELLS.index("center")
TIER_WEIGHTS = (0.2, 0.3, 0.25, 0.25)
SPLITS = ("train", "test", "heldout")
PHRASINGS = ("rich", "templates")

HELD_OUT_PAIRS = frozenset(
    {("triangle", "red"), ("circle", "yellow"), ("square", "purple"), ("diamond", "cyan"), ("cross", "orange")}
)
HELD_OUT_GLYPHS = frozenset({("A", "blue"), ("K", "green"), ("7", "red"), ("S", "yellow")})

# ------------------------------------------------------------------------------------------------ caption words
# Several words and phrases per attribute, frames, fillers and clause orders, so a model learns what the words mean
# rather than a few templates. None of them is a phrase of the held-out paraphrase set
# (`training.evaluation.paraphrases`, checked by its tests): that set measures phrasing never trained on.
SHAPE_WORDS = {
    "circle": (
        "circle",
        "circle",
        "circle",
        "disc",
        "round dot",
        "dot",
        "round shape",
        "ball",
        "orb",
        "round form",
        "round figure",
    ),
    "square": (
        "square",
        "square",
        "square",
        "box",
        "block",
        "tile",
        "square shape",
        "cube",
        "quadrate",
        "four-sided figure",
        "equal-sided box",
    ),
    "triangle": (
        "triangle",
        "triangle",
        "triangle",
        "triangle shape",
        "triangular shape",
        "pyramid",
        "trigon",
        "three-cornered figure",
        "wedge",
    ),
    "diamond": (
        "diamond",
        "diamond",
        "diamond",
        "rhombus",
        "diamond shape",
        "rhomb",
        "kite shape",
        "tilted square",
        "rotated square",
    ),
    "cross": (
        "cross",
        "cross",
        "cross",
        "plus sign",
        "plus",
        "plus symbol",
        "cross shape",
        "plus-shaped sign",
        "plus-like figure",
    ),
}
SHAPE_PLURALS = {
    "cross": "crosses",
    "box": "boxes",
    "plus": "pluses",
    "rhombus": "rhombuses",
    "plus sign": "plus signs",
}
COLOUR_WORDS = {
    "red": ("red", "red", "red", "crimson", "ruby", "cherry red", "brick red", "vermilion", "cardinal red"),
    "green": ("green", "green", "green", "emerald", "jade", "forest green", "leaf green", "lime green", "mint green"),
    "blue": ("blue", "blue", "blue", "royal blue", "sapphire", "navy", "ultramarine", "azure", "denim blue"),
    "yellow": (
        "yellow",
        "yellow",
        "yellow",
        "golden",
        "canary",
        "mustard",
        "sunflower yellow",
        "gold",
        "butter yellow",
    ),
    "purple": ("purple", "purple", "violet", "plum", "lavender", "amethyst", "grape", "mauve", "lilac"),
    "orange": ("orange", "orange", "orange", "amber", "pumpkin", "apricot", "carrot orange", "ginger", "copper"),
    "cyan": ("cyan", "cyan", "turquoise", "teal", "sky blue", "aquamarine", "ice blue", "cerulean", "sea green-blue"),
}
BACKGROUND_WORDS = {
    "black": ("black", "black", "dark", "charcoal", "coal black", "inky black", "night", "ebony", "midnight black"),
    "white": (
        "white",
        "white",
        "bright white",
        "ivory",
        "cream",
        "pure white",
        "paper white",
        "chalk white",
        "milk white",
    ),
    "gray": ("gray", "grey", "silver", "stone gray", "concrete", "medium gray", "smoke", "steel gray", "pewter"),
    "sand": ("sand", "sand", "beige", "sand-colored", "desert", "light brown", "camel", "wheat", "straw", "buff"),
}
SIZE_WORDS = {
    "small": ("small", "small", "tiny", "little", "mini", "smallish", "petite", "compact", "minute"),
    "large": ("large", "large", "big", "huge", "enormous", "massive", "large-sized", "jumbo", "bulky"),
}
CELL_PHRASES = (
    (
        "in the top left corner",
        "at the top left",
        "in the upper left",
        "toward the top left",
        "in the upper left part",
        "in the top-left",
        "top left corner",
        "at the upper-left",
        "in the north-west",
    ),
    (
        "at the top",
        "at the top center",
        "in the upper middle",
        "toward the top",
        "above the center",
        "at the top-center",
        "top middle of the image",
        "in the north",
    ),
    (
        "in the top right corner",
        "at the top right",
        "in the upper right",
        "toward the top right",
        "in the upper right part",
        "in the top-right",
        "top right corner",
        "at the upper-right",
        "in the north-east",
    ),
    (
        "on the left",
        "at the left side",
        "in the middle left",
        "on the left side",
        "left of center",
        "at the left",
        "in the left half, middle row",
        "in the west",
    ),
    (
        "in the center",
        "in the middle",
        "at the centre",
        "in the middle of the image",
        "centered in the picture",
        "in the exact center",
        "at the midpoint",
        "centrally positioned",
    ),
    (
        "on the right",
        "at the right side",
        "in the middle right",
        "on the right side",
        "right of center",
        "at the right",
        "in the right half, middle row",
        "in the east",
    ),
    (
        "in the bottom left corner",
        "at the bottom left",
        "in the lower left",
        "toward the bottom left",
        "in the lower left part",
        "in the bottom-left",
        "bottom left corner",
        "at the lower-left",
        "in the south-west",
    ),
    (
        "at the bottom",
        "at the bottom center",
        "in the lower middle",
        "toward the bottom",
        "below the center",
        "at the bottom-center",
        "bottom middle of the image",
        "in the south",
    ),
    (
        "in the bottom right corner",
        "at the bottom right",
        "in the lower right",
        "toward the bottom right",
        "in the lower right part",
        "in the bottom-right",
        "bottom right corner",
        "at the lower-right",
        "in the south-east",
    ),
)
# A cell as its grid row and column ("in the top row on the left"): a compositional way to say any place.
ROW_WORDS = (("top", "upper", "first"), ("middle", "centre", "second"), ("bottom", "lower", "last"))
COLUMN_WORDS = (
    ("on the left", "at the left", "leftmost"),
    ("in the middle", "in the centre", "central"),
    ("on the right", "at the right", "rightmost"),
)
INTENSIFIERS = ("just ", "exactly ", "directly ", "squarely ")
# Where an object sits relative to the one named before it, as a change of grid cell -> the phrase.
RELATION_PHRASES = {
    1: ("to its right", "to the right of it", "on its right side", "next to it on the right", "right beside it"),
    -1: ("to its left", "to the left of it", "on its left side", "next to it on the left", "left beside it"),
    3: ("below it", "under it", "underneath it", "one cell below it", "lower down than it"),
    -3: ("above it", "over it", "higher up than it", "one cell above it", "on top of it"),
}
CELL_LABELS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PREFIXES = (
    *("",) * 6,
    "a picture of ",
    "an image of ",
    "a drawing of ",
    "draw ",
    "show ",
    "a simple icon of ",
    "create ",
    "paint ",
    "sketch ",
    "depict ",
    "a rendering of ",
    "a graphic of ",
    "i want ",
    "show me ",
    "produce ",
    "an icon showing ",
)
SCENE_PREFIXES = ("", "", "", "there is ", "a scene with ", "draw ", "a picture with ", "show me ", "create ")
GLYPH_PREFIXES = ("", "", "write ", "an image of ", "a picture of ", "paint ", "show me ")
FILLERS = ("", "", "", "", ", simple", ", clean style", ", flat colors", ", high quality", ", nothing else")


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int


@dataclass
class Scene:
    """One sample of the domain: what is drawn, and which of its attributes the caption names.

    Parameters:
        tier (`int`): difficulty tier, 1 to 4.
        background (`str`): background colour name.
        objects (`list[SceneObject]`): shapes, each in its own grid cell (empty for a glyph scene).
        glyph (`str`, *optional*): the character drawn (tier 4).
        glyph_colour (`str`, *optional*): its colour.
        mentioned (`list[tuple]`): the attributes the caption asks for, as checks: `("background", name)`,
            `("shape", cell, name)`, `("colour", cell, name)`, `("size", cell, name)`, `("glyph", char)`,
            `("glyph_colour", name)`; `cell` is None where the caption does not say where the object is.
    """

    tier: int
    background: str
    objects: list[SceneObject] = field(default_factory=list)
    glyph: str | None = None
    glyph_colour: str | None = None
    mentioned: list[tuple] = field(default_factory=list)

    def uses_held_out(self) -> bool:
        if self.glyph is not None:
            return (self.glyph, self.glyph_colour) in HELD_OUT_GLYPHS
        return any((o.shape, o.colour) in HELD_OUT_PAIRS for o in self.objects)


@dataclass
class Sample:
    image: np.ndarray  # (32, 32, 3) uint8
    caption: str
    scene: Scene


def _rng(seed: int, split: str, index: int, attempt: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}/{split}/{index}/{attempt}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------------- scenes
def _sample_scene(rng: np.random.Generator, tier: int, alike_pairs: bool = True) -> Scene:
    """A scene of `tier`; with `alike_pairs`, some two-object scenes hold two alike objects (so captions can say
    "two red circles")."""
    if tier == 4:
        background = _pick(rng, list(BACKGROUNDS)) if rng.random() < 0.6 else DEFAULT_BACKGROUND
        scene = Scene(tier, background, glyph=_pick(rng, GLYPHS), glyph_colour=_pick(rng, list(COLOURS)))
        scene.mentioned = _background_check(rng, background)
        return scene
    if tier in (1, 2):
        scene = Scene(
            tier,
            DEFAULT_BACKGROUND,
            [SceneObject(_pick(rng, SHAPES), _pick(rng, list(COLOURS)), DEFAULT_SIZE, DEFAULT_CELL)],
        )
        if tier == 2:
            obj = scene.objects[0]
            named = [bool(rng.random() < 0.6) for _ in range(3)]
            if not any(named):
                named[int(rng.integers(3))] = True
            if named[0]:
                obj.size = _pick(rng, SIZES)
            if named[1]:
                obj.cell = int(rng.integers(len(CELLS)))
            if named[2]:
                scene.background = _pick(rng, list(BACKGROUNDS))
            scene.mentioned = [("size", None, obj.size)] if named[0] else []
            scene.mentioned += [("position", obj.cell)] if named[1] else []
            scene.mentioned += [("background", scene.background)] if named[2] else []
        return scene
    count = 2 if rng.random() < 0.6 else 3
    cells = rng.choice(len(CELLS), size=count, replace=False)
    objects = [SceneObject(_pick(rng, SHAPES), _pick(rng, list(COLOURS)), "small", int(c)) for c in cells]
    if (
        alike_pairs and count == 2 and rng.random() < 0.15
    ):  # two alike objects, which a caption may name as one plural phrase
        objects[1].shape, objects[1].colour = objects[0].shape, objects[0].colour
    background = _pick(rng, list(BACKGROUNDS)) if rng.random() < 0.5 else DEFAULT_BACKGROUND
    scene = Scene(3, background, objects)
    scene.mentioned = _background_check(rng, background)
    return scene


def _background_check(rng: np.random.Generator, background: str) -> list[tuple]:
    """A non-default background is always named; the default one sometimes."""
    named = background != DEFAULT_BACKGROUND or rng.random() < 0.2
    return [("background", background)] if named else []


def _finalise_checks(scene: Scene) -> None:
    """Turn the scene into the list of checks its caption implies (see `Scene.mentioned`)."""
    checks: list[tuple] = []
    extra = scene.mentioned
    if scene.glyph is not None:
        checks = [("glyph", scene.glyph), ("glyph_colour", scene.glyph_colour)]
        checks += [c for c in extra if c[0] == "background"]
    elif scene.tier in (1, 2):
        obj = scene.objects[0]
        where = obj.cell if any(c[0] == "position" for c in extra) else None
        checks = [("shape", where, obj.shape), ("colour", where, obj.colour)]
        checks += [("size", where, obj.size)] if any(c[0] == "size" for c in extra) else []
        checks += [c for c in extra if c[0] == "background"]
    else:
        for obj in scene.objects:
            checks += [("shape", obj.cell, obj.shape), ("colour", obj.cell, obj.colour)]
        checks += [c for c in extra if c[0] == "background"]
    scene.mentioned = checks


# -------------------------------------------------------------------------------------------------- captions
def place_phrases(cell: int) -> tuple[str, ...]:
    """Every phrase `_place` may name `cell` with."""
    row, column = divmod(cell, GRID)
    own = CELL_PHRASES[cell]
    stressed = tuple(i + p for p in own if p.startswith(("in ", "at ", "on ", "toward ")) for i in INTENSIFIERS)
    grid = tuple(
        f"at the {c} spot of the {r} row" if c.endswith("most") or c == "central" else f"in the {r} row {c}"
        for r in ROW_WORDS[row]
        for c in COLUMN_WORDS[column]
    )
    return own + stressed + grid


def _place(rng, cell: int) -> str:
    """A phrase for `cell`: one of its own, sometimes stressed ("right at the top left"), or its grid row and
    column ("in the top row on the left", "the leftmost spot of the bottom row")."""
    if rng.random() < 0.2:
        row, column = divmod(cell, GRID)
        row_word, column_word = _pick(rng, ROW_WORDS[row]), _pick(rng, COLUMN_WORDS[column])
        if column_word.endswith("most") or column_word == "central":
            return f"at the {column_word} spot of the {row_word} row"
        return f"in the {row_word} row {column_word}"
    phrase = _pick(rng, CELL_PHRASES[cell])
    if phrase.startswith(("in ", "at ", "on ", "toward ")) and rng.random() < 0.15:
        phrase = _pick(rng, INTENSIFIERS) + phrase
    return phrase


def _shape_word(rng, shape: str, plural: bool = False) -> str:
    word = _pick(rng, SHAPE_WORDS[shape])
    return (SHAPE_PLURALS.get(word) or SHAPE_PLURALS.get(word.split()[-1], word + "s")) if plural else word


def _object_phrase(rng, obj: SceneObject, with_size: bool, with_cell: bool, location_first: bool = True) -> str:
    colour = _pick(rng, COLOUR_WORDS[obj.colour])
    shape = _shape_word(rng, obj.shape)
    size = _pick(rng, SIZE_WORDS[obj.size]) if with_size else None
    where = _place(rng, obj.cell) if with_cell else None
    style = int(rng.integers(8 if location_first else 6))
    if style == 0 or (style >= 6 and where is None):
        words = [w for w in (size, colour, shape) if w]
        phrase = f"{_article(words[0])} {' '.join(words)}"
    elif style == 1:
        words = [w for w in (size, colour, shape) if w]
        phrase = " ".join(words)
    elif style == 2:
        noun = " ".join(w for w in (size, shape) if w)
        link = _pick(rng, ("that is", "in", "colored", "which is"))
        phrase = f"{_article(noun)} {noun} {link} {colour}"
    elif style == 3:
        phrase = f"{_article(shape)} {shape} of {colour} color" + (f", {size}" if size else "")
    elif style == 4:
        phrase = f"{_article(colour)} {colour} {shape}" + (f" that is {size}" if size else "")
    elif style == 5:
        phrase = f"{_article(shape)} {shape}, {colour}" + (f" and {size}" if size else "")
    else:
        noun = " ".join(w for w in (size, colour, shape) if w)
        return f"{where}, {_article(noun)} {noun}" if style == 6 else f"{where} there is {_article(noun)} {noun}"
    return f"{phrase} {where}" if where else phrase


def _background_phrase(rng, background: str) -> str:
    word = _pick(rng, BACKGROUND_WORDS[background])
    return _pick(
        rng,
        (
            f"on a {word} background",
            f"on {word}",
            f"against a {word} backdrop",
            f"with a {word} background",
            f"the background is {word}",
            f"over a {word} backdrop",
            f"{word} background",
        ),
    )


def _glyph_caption(rng, scene: Scene) -> str:
    colour = _pick(rng, COLOUR_WORDS[scene.glyph_colour])
    kind = "digit" if scene.glyph.isdigit() else "letter"
    kind = _pick(rng, (kind, kind, "character", "symbol" if kind == "digit" else "capital letter", "sign"))
    text = _pick(
        rng,
        (
            f"the {kind} {scene.glyph} in {colour}",
            f"{_article(colour)} {colour} {kind} {scene.glyph}",
            f"{_article(colour)} {colour} {scene.glyph}",
            f"the {kind} {scene.glyph} written in {colour}",
            f"{scene.glyph} in {colour}",
            f"the {kind} {scene.glyph}, colored {colour}",
            f"the {kind} {scene.glyph} painted in {colour}",
            f"{scene.glyph} written in {colour} letters",
            f"{_article(kind)} {kind} {scene.glyph} of {colour} color",
        ),
    )
    return _pick(rng, GLYPH_PREFIXES) + text


def _several_caption(rng, scene: Scene) -> str:
    """Two or three objects in a shuffled order: each at its place, or (when it is next to the one before) placed
    relative to it; two alike ones sometimes as one plural phrase."""
    order = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    prefix = _pick(rng, SCENE_PREFIXES)
    first, second = order[0], order[1]
    if len(order) == 2 and (first.shape, first.colour) == (second.shape, second.colour) and rng.random() < 0.7:
        noun = f"{_pick(rng, COLOUR_WORDS[first.colour])} {_shape_word(rng, first.shape, plural=True)}"
        wheres = [_place(rng, o.cell) for o in order]
        return prefix + _pick(
            rng, (f"two {noun}, {wheres[0]} and {wheres[1]}", f"two {noun} {wheres[0]} and {wheres[1]}")
        )
    parts = [_object_phrase(rng, first, False, True, location_first=not prefix)]
    for before, obj in zip(order, order[1:], strict=False):  # each next to the one before
        step = obj.cell - before.cell
        beside = step in (3, -3) or (step in (1, -1) and obj.cell // GRID == before.cell // GRID)
        if beside and rng.random() < 0.35:
            parts.append(f"{_object_phrase(rng, obj, False, False)} {_pick(rng, RELATION_PHRASES[step])}")
        else:
            parts.append(_object_phrase(rng, obj, False, True))
    joiner = _pick(rng, (" and ", ", ", " and also ", " along with ", " with "))
    text = ", ".join(parts[:-1]) + joiner + parts[-1]
    if rng.random() < 0.15:
        text = f"{('two', 'three')[len(order) - 2]} objects: {text}"
    return prefix + text


def _caption(rng: np.random.Generator, scene: Scene) -> str:
    background_named = any(c[0] == "background" for c in scene.mentioned)
    if scene.glyph is not None:
        text = _glyph_caption(rng, scene)
    elif scene.tier in (1, 2):
        obj = scene.objects[0]
        with_size = any(c[0] == "size" for c in scene.mentioned)
        with_cell = any(c[0] == "shape" and c[1] is not None for c in scene.mentioned)
        prefix = _pick(rng, PREFIXES)
        text = prefix + _object_phrase(rng, obj, with_size, with_cell, location_first=not prefix)
    else:
        text = _several_caption(rng, scene)
    if background_named:
        bg = _background_phrase(rng, scene.background)
        joined = bg.startswith(("on ", "against ", "with ", "over ")) and rng.random() < 0.6
        text = f"{bg}, {text}" if rng.random() < 0.25 else f"{text} {bg}" if joined else f"{text}, {bg}"
    text += _pick(rng, FILLERS)
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------- rendering
@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _jitter_colour(rng, rgb, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    r = size / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw `scene` at 4x and downsample (anti-aliased edges); small colour, position and size jitter."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), _jitter_colour(rng, BACKGROUNDS[scene.background], 6))
    draw = ImageDraw.Draw(image)
    cell = big / GRID
    if scene.glyph is not None:
        cx, cy = big / 2 + rng.uniform(-4, 4), big / 2 + rng.uniform(-4, 4)
        colour = _jitter_colour(rng, COLOURS[scene.glyph_colour], 12)
        draw.text((cx, cy), scene.glyph, font=_font(96), fill=colour, anchor="mm", stroke_width=5, stroke_fill=colour)
    for obj in scene.objects:
        row, col = divmod(obj.cell, GRID)
        cx = (col + 0.5) * cell + rng.uniform(-4, 4)
        cy = (row + 0.5) * cell + rng.uniform(-4, 4)
        size = (SIZE_PIXELS[obj.size] + rng.uniform(-0.5, 0.5)) * SUPERSAMPLE
        _draw_shape(draw, obj.shape, cx, cy, size, _jitter_colour(rng, COLOURS[obj.colour], 12))
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- the domain
class ShapesDomain:
    """Deterministic sampler of the domain: `domain.sample(i)` is the same for the same seed and split.

    Parameters:
        seed (`int`): the stream's seed.
        split (`str`): `train`, `test` (same distribution as train, other samples) or `heldout` (scenes using a
            held-out attribute combination).
        tier_weights (`tuple[float, ...]`): probability of tiers 1 to 4.
        phrasing (`str`): `"rich"` (this module's caption generator, many words, frames and clause orders) or
            `"templates"` (`training.data.template_captions`: the first generator, which the shipped models were
            trained and evaluated on; its scenes never hold two alike objects on purpose).
    """

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        tier_weights: tuple[float, ...] = TIER_WEIGHTS,
        phrasing: str = "rich",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
        self.seed, self.split, self.phrasing = seed, split, phrasing
        if phrasing == "templates":
            from .template_captions import template_caption

            self._caption = template_caption
        else:
            self._caption = _caption
        weights = np.asarray(tier_weights, dtype=np.float64)
        self.tier_probs = weights / weights.sum()

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        tier = int(_rng(self.seed, self.split, index, -1).choice(4, p=self.tier_probs)) + 1
        for attempt in range(10_000):
            rng = _rng(self.seed, self.split, index, attempt)
            scene = _sample_scene(rng, tier, alike_pairs=self.phrasing == "rich")
            if scene.uses_held_out() == (self.split == "heldout"):
                _finalise_checks(scene)
                return scene, rng
        raise RuntimeError("could not sample a scene for this split")  # unreachable with the default tables

    def sample(self, index: int) -> Sample:
        scene, rng = self.scene(index)
        caption = self._caption(rng, scene)
        return Sample(render(scene, rng), caption, scene)

    def caption(self, index: int) -> str:
        """`sample(index).caption`, without drawing the image."""
        scene, rng = self.scene(index)
        return self._caption(rng, scene)

    def batch(self, start: int, count: int) -> list[Sample]:
        return [self.sample(i) for i in range(start, start + count)]
