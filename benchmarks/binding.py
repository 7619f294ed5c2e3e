"""Attribute binding on multi-object prompts (tier 3): where a model's tier-3 alignment goes, and whether the
frozen prompt encoder's token states let one cross-attention read bind attributes to places at all.

    .venv/bin/python benchmarks/binding.py --bundle bundles/shapes/teacher --name teacher

Part 1 generates the first tier-3 evaluation prompts with the model and reads every object the prompt asks for at
the cell the prompt names: is anything drawn there, is its shape / colour right, and when wrong, does the wrong
value belong to another object of the same prompt (a binding swap) rather than to none (a drawing error)?

Part 2 trains a small read-out on frozen token states: one learned query per grid cell attends over the prompt's
tokens once (single head, the way a U-Net pixel's cross-attention reads the prompt) and classifies the shape and
colour of the object at that cell; the same read-out after a small trainable transformer over the tokens (a text
adapter) is the comparison. Real images are not involved: it asks what the text side makes readable.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from aptp.conditioning.adapter import AttentionRead
from aptp.conditioning.encoder import PromptEncoder
from aptp.formats.files import ModelFileError
from aptp.formats.report import collect_provenance, write_report
from aptp.pipeline import RoutedPipeline
from training.data.labels import collate
from training.data.shapes import COLOURS, SHAPES, Sample, ShapesDomain
from training.evaluation.evaluate import evaluation_samples
from training.evaluation.evaluator import DomainEvaluator, Reading, read_images

COLOUR_NAMES = list(COLOURS)


def object_outcomes(samples: list[Sample], readings: list[Reading]) -> dict[str, float]:
    """Per asked-for object of tier-3 `samples`: share drawn at its cell, shape / colour / both right there, and
    of the wrong shapes and colours, the share that belongs to another object of the same prompt."""
    counts = Counter()
    for sample, reading in zip(samples, readings, strict=True):
        objects = sample.scene.objects
        for obj in objects:
            counts["objects"] += 1
            shape, colour = reading.cell_shape[obj.cell], reading.cell_colour[obj.cell]
            if shape is None:
                continue
            others = [o for o in objects if o is not obj]
            counts["drawn"] += 1
            counts["shape_right"] += shape == obj.shape
            counts["colour_right"] += colour == obj.colour
            counts["both_right"] += shape == obj.shape and colour == obj.colour
            counts["shape_wrong"] += shape != obj.shape
            counts["colour_wrong"] += colour != obj.colour
            counts["shape_swapped"] += shape != obj.shape and any(o.shape == shape for o in others)
            counts["colour_swapped"] += colour != obj.colour and any(o.colour == colour for o in others)
    drawn = max(1, counts["drawn"])
    return {
        "objects": counts["objects"],
        "drawn_at_cell": counts["drawn"] / max(1, counts["objects"]),
        "shape_right_when_drawn": counts["shape_right"] / drawn,
        "colour_right_when_drawn": counts["colour_right"] / drawn,
        "both_right": counts["both_right"] / max(1, counts["objects"]),
        "wrong_shape_from_another_object": counts["shape_swapped"] / max(1, counts["shape_wrong"]),
        "wrong_colour_from_another_object": counts["colour_swapped"] / max(1, counts["colour_wrong"]),
    }


def model_outcomes(pipeline: RoutedPipeline, evaluator: DomainEvaluator, count: int, seed: int) -> dict[str, dict]:
    """`object_outcomes` of the model's images and of the real images, on the first `count` tier-3 test prompts of
    `aptp eval` (same prompts, same sampling seeds)."""
    prompts = evaluation_samples("test", 1000, seed)
    picked = [(i, s) for i, s in enumerate(prompts) if s.scene.tier == 3][:count]
    samples = [s for _, s in picked]
    made = pipeline.run([s.caption for s in samples], [seed * 100_003 + i for i, _ in picked])
    real, _ = collate(samples)
    return {
        "generated": object_outcomes(samples, read_images(evaluator, made.images)),
        "real": object_outcomes(samples, read_images(evaluator, real)),
    }


class CellReadout(nn.Module):
    """One query per grid cell, one single-head attention read over the prompt's tokens, then shape and colour
    heads; optionally a small transformer over the tokens first (the adapter)."""

    def __init__(self, token_dim: int, adapter_layers: int, width: int = 128, cells: int = 9):
        super().__init__()
        self.project = nn.Linear(token_dim, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.adapter = None
        if adapter_layers:
            self.adapter = nn.TransformerEncoder(layer, adapter_layers, enable_nested_tensor=False)
        self.read = AttentionRead(width, cells, width)
        self.shape_head = nn.Linear(width, len(SHAPES))
        self.colour_head = nn.Linear(width, len(COLOUR_NAMES))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.project(tokens)
        padding = ~mask.bool()
        if self.adapter is not None:
            states = self.adapter(states, src_key_padding_mask=padding)
        read = self.read(states, mask)
        return self.shape_head(read), self.colour_head(read)


def tier3_targets(domain: ShapesDomain, start: int, count: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Captions of the first `count` tier-3 scenes from index `start`, and per cell the shape and colour index of
    the object there (-100 for an empty cell, ignored by the loss)."""
    captions, shapes, colours = [], [], []
    index = start
    while len(captions) < count:
        sample = domain.sample(index)
        index += 1
        if sample.scene.tier != 3:
            continue
        shape, colour = torch.full((9,), -100), torch.full((9,), -100)
        for obj in sample.scene.objects:
            shape[obj.cell] = SHAPES.index(obj.shape)
            colour[obj.cell] = COLOUR_NAMES.index(obj.colour)
        captions.append(sample.caption)
        shapes.append(shape)
        colours.append(colour)
    return captions, torch.stack(shapes), torch.stack(colours)


def readout_accuracy(
    encoder: PromptEncoder, adapter_layers: tuple[int, ...], train: int, test: int, steps: int, seed: int
) -> dict[str, dict[str, float]]:
    """Shape and colour accuracy at occupied cells of held-out tier-3 captions, per adapter depth."""
    domain = ShapesDomain(seed=seed, split="train")
    data = {}
    for part, (start, count) in {"train": (0, train), "test": (10_000_000, test)}.items():
        captions, shapes, colours = tier3_targets(domain, start, count)
        encoded = [encoder.encode(captions[i : i + 256]) for i in range(0, count, 256)]
        tokens = torch.cat([e.states for e in encoded])
        mask = torch.cat([e.mask for e in encoded])
        data[part] = (tokens, mask, shapes, colours)
    results = {}
    for layers in adapter_layers:
        torch.manual_seed(seed)
        model = CellReadout(data["train"][0].shape[-1], layers)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        tokens, mask, shapes, colours = data["train"]
        for _ in range(steps):
            rows = torch.randint(len(tokens), (128,))
            shape_logits, colour_logits = model(tokens[rows], mask[rows])
            loss = F.cross_entropy(shape_logits.flatten(0, 1), shapes[rows].flatten()) + F.cross_entropy(
                colour_logits.flatten(0, 1), colours[rows].flatten()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        tokens, mask, shapes, colours = data["test"]
        with torch.no_grad():
            shape_logits, colour_logits = model(tokens, mask)
        occupied = shapes >= 0
        results[f"adapter_layers_{layers}"] = {
            "shape_accuracy": (shape_logits.argmax(-1) == shapes)[occupied].float().mean().item(),
            "colour_accuracy": (colour_logits.argmax(-1) == colours)[occupied].float().mean().item(),
        }
    return results


def markdown(report: dict) -> str:
    lines = [f"### Attribute binding on tier-3 prompts (`{report['bundle']}`)", ""]
    lines += [
        "| images | objects | drawn at the named cell | shape right (drawn) | colour right (drawn) | both right "
        "| wrong shapes from another object | wrong colours from another object |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, o in report["objects"].items():
        lines.append(
            f"| {kind} | {o['objects']} | {o['drawn_at_cell']:.3f} | {o['shape_right_when_drawn']:.3f} "
            f"| {o['colour_right_when_drawn']:.3f} | {o['both_right']:.3f} "
            f"| {o['wrong_shape_from_another_object']:.3f} | {o['wrong_colour_from_another_object']:.3f} |"
        )
    if not report["readout"]["accuracy"]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"One single-head attention read per cell over the frozen `{report['encoder']['name']}` token states "
        f"(layers {report['encoder']['layers']}), trained {report['readout']['steps']} steps on "
        f"{report['readout']['train']} tier-3 captions, scored on {report['readout']['test']} others:",
        "",
        "| trainable adapter layers before the read | shape at cell | colour at cell |",
        "|---|---|---|",
    ]
    for key, r in report["readout"]["accuracy"].items():
        lines.append(f"| {key.rsplit('_', 1)[-1]} | {r['shape_accuracy']:.3f} | {r['colour_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="teacher or bundle folder whose tier-3 images are read")
    parser.add_argument("--name", required=True, help="report name: writes <out>/<name>.{json,md}")
    parser.add_argument("--evaluator", default="bundles/shapes/evaluator")
    parser.add_argument("--prompts", type=int, default=96, help="tier-3 test prompts generated (part 1)")
    parser.add_argument("--train", type=int, default=8192, help="tier-3 captions the read-out trains on (part 2)")
    parser.add_argument("--test", type=int, default=2048, help="tier-3 captions it is scored on")
    parser.add_argument("--steps", type=int, default=1500, help="read-out training steps (batch 128)")
    parser.add_argument(
        "--adapter-layers",
        default="0,2",
        help="adapter depths to compare, comma-separated; empty ('') skips part 2 (to compare models' images only)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/binding")
    args = parser.parse_args(argv)
    try:
        depths = tuple(int(d) for d in args.adapter_layers.split(",")) if args.adapter_layers.strip() else ()
        if any(d < 0 for d in depths):
            raise ValueError
    except ValueError:
        print(f"binding.py: error: --adapter-layers {args.adapter_layers!r}: want depths like 0,2", file=sys.stderr)
        return 2
    try:
        evaluator = DomainEvaluator.load(args.evaluator)
        started = time.time()
        pipeline = RoutedPipeline.load(args.bundle)
    except (ModelFileError, ValueError, FileNotFoundError) as e:
        print(f"binding.py: error: {e}", file=sys.stderr)
        return 2
    objects = model_outcomes(pipeline, evaluator, args.prompts, args.seed)
    encoder = pipeline.encoder.encoder  # part 2 reads the frozen encoder, not the teacher's own adapter
    accuracy = readout_accuracy(encoder, depths, args.train, args.test, args.steps, args.seed) if depths else {}
    report = {
        "name": args.name,
        "bundle": args.bundle,
        "seed": args.seed,
        "objects": objects,
        "encoder": encoder.config.model_dump(),
        "readout": {"train": args.train, "test": args.test, "steps": args.steps, "accuracy": accuracy},
        "seconds": round(time.time() - started, 1),
    }
    settings = {k: getattr(args, k) for k in ("prompts", "train", "test", "steps", "adapter_layers", "seed")}
    provenance = collect_provenance([args.bundle, args.evaluator], config=settings)
    write_report(args.out, args.name, report, markdown(report), echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
