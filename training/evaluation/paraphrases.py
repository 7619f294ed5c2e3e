"""The held-out paraphrase set: shapes-domain prompts phrased the way people write them, in words and frames that
the training caption generator (`training.data.shapes`) never produces.

Quality measured on the generator's own captions says how well a model learned its templates; this set says how
well it understands the language of its domain. The scenes are the domain's (`ShapesDomain`, `test` split: no
held-out attribute combination, so the set measures phrasing alone), re-captioned by the grammar below. Its word
tables and frames are disjoint from the generator's, and `tests/training/test_paraphrases.py` checks that no
training caption contains any of its phrases. Training code never imports this module (`tests/test_architecture.py`).

The set is committed as `paraphrases.jsonl` (one labelled prompt per line: prompt, tier, scene, the checks the
prompt implies), written by `python -m training.evaluation.paraphrases`; the same test checks that the grammar still
writes exactly the committed file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from training.data.shapes import CELLS, Sample, Scene, SceneObject, ShapesDomain, render

PARAPHRASE_FILE = Path(__file__).with_name("paraphrases.jsonl")
PER_TIER = 120
PARAPHRASE_COUNT = 4 * PER_TIER
SCENE_SEED = 31
OBJECT_CHECKS = ("shape", "colour", "size")

# -------------------------------------------------------------------------------------------------- word tables
SHAPES = {
    "circle": ("circle", "disk", "round spot"),
    "square": ("square", "square patch"),
    "triangle": ("triangle", "three-sided shape"),
    "diamond": ("diamond", "lozenge"),
    "cross": ("cross", "plus mark"),
}
COLOURS = {
    "red": ("red", "scarlet"),
    "green": ("green", "grass-green"),
    "blue": ("blue", "cobalt"),
    "yellow": ("yellow", "lemon-yellow"),
    "purple": ("purple", "deep purple"),
    "orange": ("orange", "tangerine"),
    "cyan": ("cyan", "aqua"),
}
BACKGROUNDS = {
    "black": ("black", "jet-black", "pitch-black"),
    "white": ("white", "snow-white"),
    "gray": ("grey", "slate-grey", "ash-grey"),
    "sand": ("sandy", "tan", "khaki"),
}
SIZES = {"small": ("miniature", "teeny", "small-sized"), "large": ("giant", "oversized", "really big")}
# One tuple per grid cell, in `training.data.shapes.CELLS` order.
PLACES = (
    ("near the top-left corner", "in the upper-left area", "up in the northwest corner", "high up on the left"),
    ("along the top edge", "near the top, centred", "up top in the middle", "high up, halfway across"),
    ("near the top-right corner", "in the upper-right area", "up in the northeast corner", "high up on the right"),
    ("near the left edge", "on the left-hand side", "halfway down the left side", "at the far left"),
    ("right in the middle", "dead centre", "in the very centre of the frame", "smack in the middle"),
    ("near the right edge", "on the right-hand side", "halfway down the right side", "at the far right"),
    ("near the bottom-left corner", "in the lower-left area", "down in the southwest corner", "low down on the left"),
    ("along the bottom edge", "near the bottom, centred", "down low in the middle", "low down, halfway across"),
    (
        "near the bottom-right corner",
        "in the lower-right area",
        "down in the southeast corner",
        "low down on the right",
    ),
)
# Where the second object sits relative to the first, as a change of grid cell -> the phrase.
RELATIONS = {
    1: ("just to its right", "immediately to the right of it"),
    -1: ("just to its left", "immediately to the left of it"),
    3: ("directly beneath it", "straight under it"),
    -3: ("right above it", "straight over it"),
}
FRAMES = (
    "{}",
    "{}",
    "please draw {}",
    "can you make {}?",
    "i'd like {}",
    "generate {}",
    "render {}",
    "an illustration showing {}",
    "a minimalist graphic: {}",
    "make me {}",
    "a flat icon featuring {}",
    "{}, nothing fancy",
)
SCENE_FRAMES = (
    "{}",
    "please draw {}",
    "i'd like {}",
    "an illustration showing {}",
    "a layout with {}",
    "compose {}",
)
GLYPH_FRAMES = (
    "type the {kind} {g} in {c} ink",
    "{c} text reading {g}",
    "the glyph {g}, {c}",
    "a big {c} '{g}'",
    "{g}, coloured {c}",
    "print {a} {c} {g}",
    "show the character {g} in a {c} colour",
    "the {c} letterform {g}",
    "i'd like the {kind} {g} drawn in {c}",
)
# The frames' and joiners' own words, which training captions must never contain (with every word table entry
# that is not a plain attribute name; `distinctive_phrases`).
FRAME_PHRASES = (
    "please draw",
    "can you make",
    "i'd like",
    "generate",
    "render",
    "an illustration showing",
    "a minimalist graphic",
    "make me",
    "a flat icon featuring",
    "nothing fancy",
    "a layout with",
    "compose",
    "type the",
    "ink",
    "text reading",
    "glyph",
    "letterform",
    "print a",
    "show the character",
    "coloured",
    "drawn in",
    "canvas",
    "the backdrop is",
    "set against",
    "plain",
    "field",
    "behind it",
    "together with",
    "as well as",
    "a pair of",
    "and the other",
    "shapes:",
    "placed",
    "sitting",
    "; also",
)
BACKGROUND_FRAMES = (
    "on {a} {word} canvas",
    "the backdrop is {word}",
    "set against {word}",
    "over a plain {word} field",
    "{word} behind it",
)


def distinctive_phrases() -> list[str]:
    """Every phrase of this grammar that is more than a plain attribute name ("red", "circle", "grey"): what no
    training caption may contain for the set to measure phrasing never trained on."""
    plain = {*SHAPES, *COLOURS, *BACKGROUNDS, "grey"}
    tables = [*SHAPES.values(), *COLOURS.values(), *BACKGROUNDS.values(), *SIZES.values(), *PLACES, *RELATIONS.values()]
    return sorted({phrase for table in tables for phrase in table if phrase not in plain} | set(FRAME_PHRASES))


def _rng(index: int, tier: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"paraphrase/{tier}/{index}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _object(rng, obj: SceneObject, with_size: bool) -> str:
    """One object with its colour (and size), in one of several word orders."""
    colour, shape = _pick(rng, COLOURS[obj.colour]), _pick(rng, SHAPES[obj.shape])
    size = _pick(rng, SIZES[obj.size]) if with_size else None
    style = int(rng.integers(6))
    if style == 0:
        words = " ".join(w for w in (size, colour, shape) if w)
        return f"{_article(words)} {words}"
    if style == 1:
        noun = " ".join(w for w in (size, shape) if w)
        return f"{_article(noun)} {noun} coloured {colour}"
    if style == 2:
        return f"{_article(shape)} {shape} ({colour}" + (f", {size})" if size else ")")
    if style == 3:
        noun = " ".join(w for w in (size, f"{colour}-coloured" if " " not in colour else colour, shape) if w)
        return f"{_article(noun)} {noun}"
    if style == 4:
        return f"{_article(shape)} {shape} that's " + (f"{size} and {colour}" if size else colour)
    return f"one {' '.join(w for w in (size, colour, shape) if w)}"


def _placed(rng, phrase: str, cell: int, place_first: bool) -> str:
    """`phrase` at its place; with `place_first`, sometimes the place leads ("up top in the middle: a ...")."""
    place = _pick(rng, PLACES[cell])
    orders = [f"{phrase} {place}", f"{phrase} placed {place}", f"{phrase}, sitting {place}"]
    orders += [f"{place}: {phrase}", f"{place}, {phrase}"] if place_first else []
    return _pick(rng, orders)


def _with_background(rng, text: str, background: str, lead: bool) -> str:
    """The background before or after `text` (before it when `lead`: a question ends the prompt)."""
    word = _pick(rng, BACKGROUNDS[background])
    ground = _pick(rng, BACKGROUND_FRAMES).format(word=word, a=_article(word))
    return f"{ground}, {text}" if lead or rng.random() < 0.3 else f"{text}, {ground}"


def _named(scene: Scene, kind: str) -> bool:
    return any(check[0] == kind for check in scene.mentioned)


def _single(rng, scene: Scene) -> str:
    obj = scene.objects[0]
    with_cell = any(check[0] == "shape" and check[1] is not None for check in scene.mentioned)
    text = _object(rng, obj, with_size=_named(scene, "size"))
    frame = _pick(rng, FRAMES)
    if with_cell:
        text = _placed(rng, text, obj.cell, place_first=frame == "{}")
    return frame.format(text)


def _several(rng, scene: Scene) -> str:
    frame = _pick(rng, SCENE_FRAMES)
    objects = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    first, second = objects[0], objects[1]
    step = second.cell - first.cell
    same_row = first.cell // 3 == second.cell // 3
    related = step in (3, -3) or (step in (1, -1) and same_row)
    if len(objects) == 2 and rng.random() < 0.3:
        # "a pair of": both objects the same shape and colour, one place each.
        second.shape, second.colour = first.shape, first.colour
        noun = _plural(_pick(rng, SHAPES[first.shape]))
        places = [_pick(rng, PLACES[o.cell]) for o in objects]
        text = f"a pair of {_pick(rng, COLOURS[first.colour])} {noun}, one {places[0]} and the other {places[1]}"
    elif related and rng.random() < 0.6:
        anchor = _placed(rng, _object(rng, first, False), first.cell, place_first=False)
        text = f"{anchor}, with {_object(rng, second, False)} {_pick(rng, RELATIONS[step])}"
        if len(objects) == 3:
            text += f"; also {_placed(rng, _object(rng, objects[2], False), objects[2].cell, place_first=False)}"
    else:
        joiner = _pick(rng, ("; ", " plus ", " together with ", " as well as "))
        # A place may lead a clause after a semicolon, and the first clause only where no frame comes before it.
        leads = [joiner == "; " and (k > 0 or frame == "{}") for k in range(len(objects))]
        parts = [_placed(rng, _object(rng, o, False), o.cell, lead) for o, lead in zip(objects, leads, strict=True)]
        text = joiner.join(parts)
        if rng.random() < 0.4 and not leads[0]:
            text = f"{'two' if len(parts) == 2 else 'three'} shapes: {text}"
    return frame.format(text)


def _glyph(rng, scene: Scene) -> str:
    kind = "number" if scene.glyph.isdigit() else "letter"
    colour = _pick(rng, COLOURS[scene.glyph_colour])
    return _pick(rng, GLYPH_FRAMES).format(kind=kind, g=scene.glyph, c=colour, a=_article(colour))


def paraphrase(scene: Scene, rng: np.random.Generator) -> str:
    """A prompt for `scene` naming exactly what `scene.mentioned` checks (a "pair of" prompt first makes the
    scene's two objects alike, so its checks change with it)."""
    if scene.glyph is not None:
        text = _glyph(rng, scene)
    elif scene.tier in (1, 2):
        text = _single(rng, scene)
    else:
        text = _several(rng, scene)
        checks = [c for c in scene.mentioned if c[0] == "background"]
        scene.mentioned = [(k, o.cell, getattr(o, k)) for o in scene.objects for k in ("shape", "colour")] + checks
    if _named(scene, "background"):
        text = _with_background(rng, text, scene.background, lead=text.endswith("?"))
    return " ".join(text.split())


def write_records(per_tier: int = PER_TIER) -> list[dict]:
    """`per_tier` labelled prompts of each tier, from the domain's `test` scenes."""
    domain, records, counts, index = ShapesDomain(seed=SCENE_SEED, split="test"), [], dict.fromkeys(range(1, 5), 0), 0
    while min(counts.values()) < per_tier:
        scene, _ = domain.scene(index)
        index += 1
        if counts[scene.tier] >= per_tier:
            continue
        counts[scene.tier] += 1
        prompt = paraphrase(scene, _rng(counts[scene.tier], scene.tier))
        records.append({"prompt": prompt, "tier": scene.tier, "scene": _scene_record(scene)})
    return records


def _scene_record(scene: Scene) -> dict:
    return {
        "background": scene.background,
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "cell": CELLS[o.cell]} for o in scene.objects
        ],
        "glyph": scene.glyph,
        "glyph_colour": scene.glyph_colour,
        "checks": [_check_record(check) for check in scene.mentioned],
    }


def _check_record(check: tuple) -> list:
    """A check with its cell by name (`("colour", 4, "red")` -> `["colour", "center", "red"]`)."""
    if check[0] in OBJECT_CHECKS:
        return [check[0], None if check[1] is None else CELLS[check[1]], check[2]]
    return list(check)


def _scene(record: dict, tier: int) -> Scene:
    objects = [SceneObject(o["shape"], o["colour"], o["size"], CELLS.index(o["cell"])) for o in record["objects"]]
    checks = []
    for check in record["checks"]:
        if check[0] in OBJECT_CHECKS:
            checks.append((check[0], None if check[1] is None else CELLS.index(check[1]), check[2]))
        else:
            checks.append(tuple(check))
    return Scene(tier, record["background"], objects, record["glyph"], record["glyph_colour"], checks)


def load_paraphrases(path: str | Path = PARAPHRASE_FILE, image_seed: int = 0) -> list[Sample]:
    """The set as domain samples: each prompt with its scene, and a real image of the scene (drawn with
    `image_seed`; another seed draws the disjoint real set that FID floors are measured against)."""
    samples = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
            scene = _scene(record["scene"], int(record["tier"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {line_number}: not a labelled paraphrase ({e})") from None
        image = render(scene, _rng(line_number + 1_000_003 * image_seed, -1))
        samples.append(Sample(image, record["prompt"], scene))
    return samples


def main() -> None:
    lines = [json.dumps(record, sort_keys=True) for record in write_records()]
    PARAPHRASE_FILE.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} prompts written to {PARAPHRASE_FILE}")


if __name__ == "__main__":
    main()
