"""Training data: what the search, fine-tuning and baseline jobs draw images and captions from.

Two sources, one interface (`TrainingData`): the embedded shapes domain (generated on the fly) and a local
image-caption folder as its users keep it, the layout of the `datasets` library's `imagefolder`:

```
data/
  metadata.jsonl      one JSON object a line: {"file_name": "images/0001.png", "text": "a red bicycle"}
  images/0001.png ...
```
Images are converted to RGB, resized so the short side is the training resolution and centre-cropped (or randomly
cropped), and optionally flipped. The order is a function of the seed and the sample's position in the run (a new
permutation each epoch), so a run resumed mid-epoch sees exactly the images a straight run would. Bad entries (a
missing caption, a file named but absent, an image that does not decode) are found when the folder is opened and
are either refused with the file's name or skipped and listed, per `on_error`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from .labels import collate, images_to_unit_range
from .shapes import ShapesDomain

METADATA = "metadata.jsonl"


class DatasetError(ValueError):
    """An image-caption folder has an entry that cannot be used; the message names the file."""


class TrainingData(Protocol):
    """Images and captions by position in a run (deterministic: the same position gives the same sample)."""

    def __len__(self) -> int: ...

    def take(self, positions: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        """Images `(len(positions), 3, R, R)` float in [-1, 1] and their captions."""
        ...

    def captions(self, positions: Sequence[int]) -> list[str]:
        """The captions of those positions (no image is read)."""
        ...


class ShapesData:
    """The embedded shapes domain as training data (its images are 32x32)."""

    def __init__(self, seed: int, split: str = "train", phrasing: str = "rich"):
        self.domain = ShapesDomain(seed=seed, split=split, phrasing=phrasing)

    def __len__(self) -> int:
        return 2**31 - 1  # generated: every position is a new sample

    def take(self, positions: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        samples = [self.domain.sample(int(i)) for i in positions]
        images, _ = collate(samples)
        return images_to_unit_range(images), [s.caption for s in samples]

    def captions(self, positions: Sequence[int]) -> list[str]:
        return [self.domain.caption(int(i)) for i in positions]


class CaptionFolderConfig(BaseModel):
    """A local image-caption folder to train on.

    Parameters:
        folder (`str`): the folder holding `metadata.jsonl` and the images it names.
        center_crop (`bool`): centre crop after resizing (False: a random crop, drawn per sample).
        random_flip (`bool`): flip half the samples left to right.
        on_error (`str`): `refuse` stops at the first bad entry, naming its file; `skip` leaves bad entries out and
            lists them.
    """

    model_config = ConfigDict(extra="forbid")

    folder: str
    center_crop: bool = True
    random_flip: bool = False
    on_error: Literal["refuse", "skip"] = "refuse"
    max_samples: int | None = Field(None, ge=1, description="use only the first entries (for quick runs)")
    latent_cache: str | None = Field(
        None, description="a folder to keep the VAE posteriors of the images in (built once, reused by every job)"
    )


@dataclass(frozen=True)
class CaptionedFile:
    path: Path
    caption: str


class CaptionFolder:
    """A local image-caption folder (`metadata.jsonl` with `file_name` and `text`), read at `resolution`.

    Parameters:
        config (`CaptionFolderConfig`): where and how.
        resolution (`int`): the training images' side in pixels.
        seed (`int`): the order of the samples.
    """

    def __init__(self, config: CaptionFolderConfig, resolution: int, seed: int):
        self.config, self.resolution, self.seed = config, resolution, seed
        self.folder = Path(config.folder)
        self.entries, self.skipped = self._read_entries()
        if not self.entries:
            raise DatasetError(f"{self.folder / METADATA}: no usable entries")

    def _read_entries(self) -> tuple[list[CaptionedFile], list[str]]:
        metadata = self.folder / METADATA
        if not metadata.is_file():
            raise DatasetError(f"{metadata}: file not found (an image-caption folder has metadata.jsonl)")
        entries, skipped = [], []
        for number, line in enumerate(metadata.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                problem = None if isinstance(entry, dict) else "not a JSON object"
            except json.JSONDecodeError as e:
                entry, problem = {}, f"not valid JSON ({e})"
            name, text = entry.get("file_name"), entry.get("text")
            if problem is None and not isinstance(name, str):
                problem = "no file_name"
            if problem is None and (not isinstance(text, str) or not text.strip()):
                problem = f"{name}: no caption (text)"
            if problem is None:
                problem = self._image_problem(self.folder / name)
            if problem is not None:
                where = f"{metadata}:{number}: {problem}"
                if self.config.on_error == "refuse":
                    raise DatasetError(where + " (set on_error: skip to leave such entries out)")
                skipped.append(where)
                continue
            entries.append(CaptionedFile(self.folder / name, text))
            if self.config.max_samples is not None and len(entries) == self.config.max_samples:
                break
        for where in skipped:
            print(f"skipped {where}")
        return entries, skipped

    @staticmethod
    def _image_problem(path: Path) -> str | None:
        if not path.is_file():
            return f"{path}: named in metadata.jsonl but missing"
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            return f"{path}: not a readable image ({e})"
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def index(self, position: int) -> int:
        """The entry at a run's `position`: epoch `position // N` is a permutation drawn from the seed."""
        epoch, offset = divmod(int(position), len(self.entries))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.entries))
        return int(order[offset])

    def load(self, entry: CaptionedFile, rng: np.random.Generator) -> torch.Tensor:
        """One image as `(3, R, R)` uint8: RGB, short side resized to R, cropped (centre or random), maybe flipped."""
        with Image.open(entry.path) as opened:
            image = opened.convert("RGB")
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        spare_x, spare_y = image.width - self.resolution, image.height - self.resolution
        if self.config.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.config.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def take(self, positions: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        images, captions = [], []
        for position in positions:
            entry = self.entries[self.index(position)]
            rng = np.random.default_rng([self.seed, int(position), 1])  # crop and flip of this position
            try:
                images.append(self.load(entry, rng))
            except (OSError, ValueError) as e:  # changed on disk since it was checked
                raise DatasetError(f"{entry.path}: cannot be read ({e})") from None
            captions.append(entry.caption)
        return images_to_unit_range(torch.stack(images)), captions

    def captions(self, positions: Sequence[int]) -> list[str]:
        return [self.entries[self.index(p)].caption for p in positions]


def training_data(
    config: CaptionFolderConfig | None, resolution: int, seed: int, phrasing: str = "rich"
) -> TrainingData:
    """The configured folder at `resolution`, or the embedded shapes domain (its captions in `phrasing`) when none
    is configured."""
    if config is None:
        return ShapesData(seed, phrasing=phrasing)
    return CaptionFolder(config, resolution, seed)


def read_prompt_file(path: str | Path) -> list[str]:
    """A caption-only prompt file: one prompt a line (blank lines and lines starting with `#` ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DatasetError(f"{path}: no prompts")
    return prompts
