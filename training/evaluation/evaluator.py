"""The domain evaluator: a small CNN that reads the shapes domain's attributes back from an image.

It scores prompt alignment (the share of a prompt's attributes it finds in the generated image: this domain's
analogue of CLIP score) and gives the features for the domain FID and CMMD (its penultimate layer).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from aptp.formats.files import load_matching_state, read_json_object, validate_description, write_description
from training.data.labels import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    HEADS,
    IGNORE,
    PER_CELL_HEADS,
    collate,
    images_to_unit_range,
)
from training.data.shapes import CELLS, GLYPHS, SHAPES, SIZES, Scene, ShapesDomain

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class EvaluatorConfig(BaseModel):
    """Parameters:
    width (`int`): channels of the first stage (doubled at 16x16 and 8x8).
    feature_dim (`int`): size of the penultimate layer (the FID / CMMD features).
    """

    model_config = ConfigDict(extra="forbid")

    width: int = Field(32, ge=1)
    feature_dim: int = Field(256, ge=1)


class DomainEvaluator(nn.Module):
    """Three conv stages (32, 16, 8 px), a feature layer, and one linear head per attribute (per-cell heads output
    `9 x classes`)."""

    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = config or EvaluatorConfig()
        w = self.config.width

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.trunk = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 4 * w))  # (N, 4w, 4, 4)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, self.config.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.1)
        self.heads = nn.ModuleDict(
            {
                name: nn.Linear(self.config.feature_dim, classes * (len(CELLS) if name in PER_CELL_HEADS else 1))
                for name, classes in HEADS.items()
            }
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 3, 32, 32)` in [-1, 1] -> `(N, feature_dim)` penultimate features."""
        return self.feature(self.trunk(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head: `(N, classes)`, or `(N, 9, classes)` for the per-cell heads."""
        h = self.dropout(self.features(images))
        out = {}
        for name, head in self.heads.items():
            logits = head(h)
            out[name] = logits.view(len(h), len(CELLS), -1) if name in PER_CELL_HEADS else logits
        return out

    # ---------------------------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_description(folder / CONFIG_NAME, self.config)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> DomainEvaluator:
        folder = Path(folder)
        path = folder / CONFIG_NAME
        config = validate_description(path, EvaluatorConfig, read_json_object(path))
        model = cls(config)
        model.load_state_dict(load_matching_state(folder / WEIGHTS_NAME, model.state_dict(), None, device))
        return model.to(device).eval()


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    total = logits["background"].new_zeros(())
    for name, value in logits.items():
        flat = value.reshape(-1, value.shape[-1])
        target = targets[name].reshape(-1)
        if (target != IGNORE).any():
            total = total + F.cross_entropy(flat, target, ignore_index=IGNORE)
    return total


@torch.no_grad()
def head_accuracy(model: DomainEvaluator, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy of every head on uint8 images (cells and glyph colour only where something is drawn)."""
    model.eval()
    correct = {k: 0 for k in HEADS}
    count = {k: 0 for k in HEADS}
    for start in range(0, len(images), 256):
        logits = model(images_to_unit_range(images[start : start + 256]))
        for name, value in logits.items():
            target = targets[name][start : start + 256]
            valid = target != IGNORE
            correct[name] += int(((value.argmax(-1) == target) & valid).sum())
            count[name] += int(valid.sum())
    return {k: correct[k] / max(count[k], 1) for k in HEADS}


def _dataset(seed: int, count: int, splits: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    samples = []
    for k, split in enumerate(splits):
        samples += ShapesDomain(seed + k, split).batch(0, count // len(splits))
    return collate(samples)


def train_evaluator(
    out: str | Path,
    steps: int = 3000,
    batch_size: int = 128,
    train_images: int = 60_000,
    seed: int = 1000,
    device: str = "cpu",
) -> dict[str, float]:
    """Train the evaluator on generated images (train and held-out-combination scenes, its own seeds) and report
    each head's accuracy on fresh images. Writes `config.json`, `model.safetensors` and `accuracy.json`."""
    torch.manual_seed(seed)
    started = time.time()
    images, targets = _dataset(seed, train_images, ("train", "heldout"))
    test_images, test_targets = _dataset(seed + 100, 6000, ("test", "heldout"))
    model = DomainEvaluator().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(steps), desc="evaluator", mininterval=5)
    for _ in progress:
        model.train()
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x = images_to_unit_range(images[idx]).to(device)
        # Photometric noise so the evaluator tolerates the small errors of generated images.
        x = x + 0.03 * torch.randn(x.shape, generator=generator).to(device)
        loss = _loss(model(x), {k: v[idx].to(device) for k, v in targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    accuracy = head_accuracy(model.cpu(), test_images, test_targets)
    model.save(out)
    report = {"accuracy": accuracy, "steps": steps, "train_images": train_images, "seconds": time.time() - started}
    (Path(out) / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    return accuracy


# ---------------------------------------------------------------------------------------------- alignment
@dataclass
class Reading:
    """What the evaluator reads in one image (argmax of every head)."""

    background: str
    cell_shape: list[str | None]
    cell_colour: list[str]
    cell_size: list[str]
    occupied: np.ndarray  # (9,) probability that each cell holds an object
    glyph: str | None
    glyph_colour: str


@torch.no_grad()
def read_images(model: DomainEvaluator, images: torch.Tensor) -> list[Reading]:
    """uint8 `(N, 3, 32, 32)` images -> one [`Reading`] each."""
    readings = []
    for start in range(0, len(images), 256):
        logits = model(images_to_unit_range(images[start : start + 256]))
        occupied = 1 - logits["cell_shape"].softmax(-1)[..., 0]
        for i in range(len(logits["background"])):
            shapes = logits["cell_shape"][i].argmax(-1).tolist()
            glyph = int(logits["glyph"][i].argmax())
            readings.append(
                Reading(
                    background=BACKGROUND_NAMES[int(logits["background"][i].argmax())],
                    cell_shape=[None if s == 0 else SHAPES[s - 1] for s in shapes],
                    cell_colour=[COLOUR_NAMES[c] for c in logits["cell_colour"][i].argmax(-1).tolist()],
                    cell_size=[SIZES[c] for c in logits["cell_size"][i].argmax(-1).tolist()],
                    occupied=occupied[i].numpy(),
                    glyph=None if glyph == 0 else GLYPHS[glyph - 1],
                    glyph_colour=COLOUR_NAMES[int(logits["glyph_colour"][i].argmax())],
                )
            )
    return readings


def alignment(scene: Scene, reading: Reading) -> float:
    """Share of the attributes the prompt names that the evaluator finds in the image. An object whose place the
    prompt does not name is looked for in the cell most likely to hold an object."""
    found = 0
    for check in scene.mentioned:
        kind = check[0]
        if kind == "background":
            found += reading.background == check[1]
        elif kind == "glyph":
            found += reading.glyph == check[1]
        elif kind == "glyph_colour":
            found += reading.glyph is not None and reading.glyph_colour == check[1]
        else:
            cell = check[1] if check[1] is not None else int(np.argmax(reading.occupied))
            if reading.cell_shape[cell] is None:
                continue
            if kind == "shape":
                found += reading.cell_shape[cell] == check[2]
            elif kind == "colour":
                found += reading.cell_colour[cell] == check[2]
            elif kind == "size":
                found += reading.cell_size[cell] == check[2]
    return found / len(scene.mentioned)
