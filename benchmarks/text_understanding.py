"""How well the teacher's text side reads prompts it was not trained on, before any U-Net is trained.

    .venv/bin/python benchmarks/text_understanding.py --config configs/shapes/teacher.yaml --name rich-captions

The teacher's U-Net draws what its text adapter makes readable (`training.layout`: one read per grid cell, as a
U-Net pixel reads the prompt). This script pre-trains the adapter and its layout read-out exactly as
`aptp train teacher` does before the U-Net's first step (the config's `text_adapter.pretrain_*` settings, on the
training caption generator), then scores the read-out's prompt by prompt: the share of what a prompt asks for
(`Scene.mentioned`: shape, colour and size at a cell, background, glyph, glyph colour) that it reads back from the
prompt alone, per tier, on template captions of the test split and on the held-out paraphrase set. No image is
generated; a recipe that fails here on paraphrases makes a teacher that fails there, for about 5 minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import yaml

from aptp.conditioning.adapter import TextAdapter
from aptp.conditioning.encoder import PromptEncoder
from aptp.formats.report import collect_provenance, write_report
from training.config import ConfigError, load_config
from training.data.labels import BACKGROUND_NAMES, COLOUR_NAMES
from training.data.shapes import DEFAULT_CELL, GLYPHS, SHAPES, SIZES, Sample, ShapesDomain
from training.evaluation.evaluate import evaluation_samples
from training.evaluation.metrics import mean_by_tier
from training.evaluation.paraphrases import load_paraphrases
from training.layout import PromptLayoutHead, pretrain_adapter
from training.teacher import TeacherConfig


def read_prompts(adapter, head, encoder, prompts: list[str]) -> dict[str, np.ndarray]:
    """The read-out's most likely class per head (per-cell heads: `(N, cells)`)."""
    adapter.eval()
    with torch.no_grad():
        logits = head(adapter(encoder.encode(prompts)))
    return {name: value.argmax(-1).cpu().numpy() for name, value in logits.items()}


def check_kind(check: tuple) -> str:
    """A check's attribute, with an object's placed or unplaced reading apart ("colour at a cell")."""
    if check[0] in ("shape", "colour", "size"):
        return f"{check[0]} at a named cell" if check[1] is not None else f"{check[0]}"
    return check[0]


def text_alignment(samples: list[Sample], reads: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
    """Per prompt, the share of its checks the read-out gets right (an unplaced object is read at the centre,
    where the domain draws it); and the share right per kind of check (`check_kind`)."""
    scores, by_kind = [], {}
    for i, sample in enumerate(samples):
        right = []
        for check in sample.scene.mentioned:
            kind = check[0]
            if kind == "background":
                right.append(BACKGROUND_NAMES[reads["background"][i]] == check[1])
            elif kind == "glyph":
                right.append(reads["glyph"][i] > 0 and GLYPHS[reads["glyph"][i] - 1] == check[1])
            elif kind == "glyph_colour":
                right.append(COLOUR_NAMES[reads["glyph_colour"][i]] == check[1])
            else:
                cell = DEFAULT_CELL if check[1] is None else check[1]
                if kind == "shape":
                    read = reads["cell_shape"][i, cell]
                    right.append(read > 0 and SHAPES[read - 1] == check[2])
                elif kind == "colour":
                    right.append(COLOUR_NAMES[reads["cell_colour"][i, cell]] == check[2])
                elif kind == "size":
                    right.append(SIZES[reads["cell_size"][i, cell]] == check[2])
        for check, ok in zip(sample.scene.mentioned, right, strict=True):
            by_kind.setdefault(check_kind(check), []).append(bool(ok))
        scores.append(float(np.mean(right)))
    return np.asarray(scores), {kind: round(float(np.mean(v)), 4) for kind, v in sorted(by_kind.items())}


def load_text_side(run: str, adapter: torch.nn.Module, head: torch.nn.Module) -> int:
    """Load a teacher run's checkpointed adapter and layout read-out (the trained weights, not the EMA); returns
    the step the checkpoint was taken at."""
    from safetensors.torch import load_file

    from training.checkpoint import STATE, TENSORS, latest_checkpoint

    folder = latest_checkpoint(run)
    if folder is None:
        raise SystemExit(f"{run}: no checkpoint yet")
    tensors = load_file(str(folder / TENSORS))
    for prefix, module in (("unet/adapter.", adapter), ("unet/layout.", head)):
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return int(json.loads((folder / STATE).read_text())["state"]["step"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/shapes/teacher.yaml", help="the teacher config whose recipe to test"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--name", default="teacher-recipe")
    parser.add_argument(
        "--run",
        metavar="FOLDER",
        help="score the text side of a teacher run's latest checkpoint (`aptp train teacher --out FOLDER`) instead "
        "of pre-training one: the adapter and read-out as training has left them (give the run's --config)",
    )
    parser.add_argument("--test-prompts", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/text-understanding")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE (got {item!r})")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        config = load_config(args.config, TeacherConfig, overrides)
    except ConfigError as e:
        parser.error(str(e))
    settings = config.text_adapter
    if settings is None or not settings.has_layout_read:
        print(f"{args.config}: the recipe has no text adapter with a layout read-out to test", file=sys.stderr)
        return 2
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    encoder = PromptEncoder(config.text_encoder)
    adapter = TextAdapter(settings.adapter_config(encoder.token_dim))
    head = PromptLayoutHead(settings.width, summary=settings.summary_tokens > 0)
    started = time.perf_counter()
    if args.run:
        step = load_text_side(args.run, adapter, head)
        title = f"Text side of the teacher run `{args.run}` at step {step}"
    else:
        pretrain_adapter(
            adapter,
            head,
            encoder,
            ShapesDomain(seed=config.seed, split="train"),
            settings.pretrain_steps,
            settings.pretrain_captions,
            settings.pretrain_batch_size,
            settings.pretrain_lr,
            config.seed,
            log=lambda record: None,
        )
        title = f"Text side of `{args.config}` after pre-training ({settings.pretrain_steps} steps)"
    seconds = time.perf_counter() - started
    sets = {
        "test": evaluation_samples("test", args.test_prompts, seed=7),  # the template prompts `aptp eval` scores
        "paraphrases": load_paraphrases(),
    }
    figures = {"name": args.name, "pretrain_seconds": round(seconds, 1), "sets": {}}
    rows, kinds = [], []
    for name, samples in sets.items():
        scores, by_kind = text_alignment(samples, read_prompts(adapter, head, encoder, [s.caption for s in samples]))
        by_tier = mean_by_tier(scores, np.array([s.scene.tier for s in samples]))
        figures["sets"][name] = {
            "prompts": len(samples),
            "text_alignment": by_tier,
            "by_check": by_kind,
            "per_prompt": [[s.caption, round(float(v), 3)] for s, v in zip(samples, scores, strict=True)],
        }
        cells = " | ".join(f"{by_tier.get(f'tier{t}', float('nan')):.3f}" for t in range(1, 5))
        rows.append(f"| {args.name} | {name} | {len(samples)} | {by_tier['overall']:.3f} | {cells} |")
        kinds.append(f"| {args.name} | {name} | " + "; ".join(f"{k} {v:.2f}" for k, v in by_kind.items()) + " |")
    table = "\n".join(
        [
            f"### {title} ({seconds / 60:.1f} min)",
            "",
            "Share of what each prompt asks for that the layout read-out reads back from the prompt alone.",
            "",
            "| recipe | prompts | count | text alignment | tier 1 | tier 2 | tier 3 | tier 4 |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Share right per kind of check:",
            "",
            "| recipe | prompts | by check |",
            "|---|---|---|",
            *kinds,
        ]
    )
    provenance = collect_provenance(config=config.model_dump(mode="json") | {"overrides": overrides})
    write_report(args.out, args.name, figures, table + "\n", echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
