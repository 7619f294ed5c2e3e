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

HELD_OUT_PAIRS = frozenset(
    {("triangle", "red"), ("circle", "yellow"), ("square", "purple"), ("diamond", "cyan"), ("cross", "orange")}
)
HELD_OUT_GLYPHS = frozenset({("A", "blue"), ("K", "green"), ("7", "red"), ("S", "yellow")})

# ------------------------------------------------------------------------------------------------ caption words
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
CELL_LABELS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "draw ", "show ", "a simple icon of ")
GLYPH_PREFIXES = ("", "", "write ", "an image of ", "a picture of ")


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
def _sample_scene(rng: np.random.Generator, tier: int) -> Scene:
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


def _caption(rng: np.random.Generator, scene: Scene) -> str:
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
    """

    def __init__(self, seed: int = 0, split: str = "train", tier_weights: tuple[float, ...] = TIER_WEIGHTS):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.seed, self.split = seed, split
        weights = np.asarray(tier_weights, dtype=np.float64)
        self.tier_probs = weights / weights.sum()

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        tier = int(_rng(self.seed, self.split, index, -1).choice(4, p=self.tier_probs)) + 1
        for attempt in range(10_000):
            rng = _rng(self.seed, self.split, index, attempt)
            scene = _sample_scene(rng, tier)
            if scene.uses_held_out() == (self.split == "heldout"):
                _finalise_checks(scene)
                return scene, rng
        raise RuntimeError("could not sample a scene for this split")  # unreachable with the default tables

    def sample(self, index: int) -> Sample:
        scene, rng = self.scene(index)
        caption = _caption(rng, scene)
        return Sample(render(scene, rng), caption, scene)

    def batch(self, start: int, count: int) -> list[Sample]:
        return [self.sample(i) for i in range(start, start + count)]
