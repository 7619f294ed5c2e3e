"""A latent cache: each image of a caption folder VAE-encoded once, kept as safetensors shards and reused by the
search, the fine-tuning and the baseline.

What is cached is the VAE posterior of each image (its mean and standard deviation), not one draw from it: a step
still draws its latents from the posterior with the step's generator, exactly as without the cache, so a run gives
the same numbers with or without it (up to the float rounding of encoding images in other batches). A cached
latent is one crop, so the cache needs `center_crop: true` and `random_flip: false`. The cache records what it was
made from (the metadata file, the VAE's files, the resolution) and is rebuilt when any of them changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from aptp.formats.files import file_sha256, validate_description, write_description

from .captions import METADATA, CaptionFolder, DatasetError

INDEX = "index.json"
SHARD = 256  # images per shard file


class LatentCacheIndex(BaseModel):
    """`index.json` of a latent cache: what it was made from, and its shards."""

    model_config = ConfigDict(extra="forbid")

    metadata_sha256: str
    vae_sha256: dict[str, str]
    resolution: int
    entries: int
    shards: list[str]


def _vae_hashes(vae_folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(vae_folder.iterdir()) if p.is_file()}


class LatentCache:
    """The posteriors of every entry of `data` under `vae` (built in `folder` on first use, reused after).

    Parameters:
        folder (`str`): where the shards live.
        data (`CaptionFolder`): the images (centre-cropped, not flipped).
        vae (`nn.Module`): the pipeline's VAE; `vae_folder` is where its files are (their checksums key the cache).
    """

    def __init__(self, folder: str | Path, data: CaptionFolder, vae: nn.Module, vae_folder: Path, batch: int = 16):
        if not data.config.center_crop or data.config.random_flip:
            raise DatasetError(
                f"{folder}: a latent cache holds one crop per image: it needs center_crop: true and random_flip: false"
            )
        self.folder = Path(folder)
        expected = LatentCacheIndex(
            metadata_sha256=file_sha256(data.folder / METADATA),
            vae_sha256=_vae_hashes(vae_folder),
            resolution=data.resolution,
            entries=len(data),
            shards=[],
        )
        index = self._read_index()
        if index is None or index.model_dump(exclude={"shards"}) != expected.model_dump(exclude={"shards"}):
            index = self._build(expected, data, vae, batch)
        parts = [load_file(self.folder / shard) for shard in index.shards]
        self.mean = torch.cat([part["mean"] for part in parts])  # (N, C, h, w)
        self.std = torch.cat([part["std"] for part in parts])

    def _read_index(self) -> LatentCacheIndex | None:
        path = self.folder / INDEX
        if not path.is_file():
            return None
        import json

        index = validate_description(path, LatentCacheIndex, json.loads(path.read_text()), DatasetError)
        return index if all((self.folder / shard).is_file() for shard in index.shards) else None

    @torch.no_grad()
    def _build(self, index: LatentCacheIndex, data: CaptionFolder, vae: nn.Module, batch: int) -> LatentCacheIndex:
        self.folder.mkdir(parents=True, exist_ok=True)
        parameter = next(vae.parameters())
        rng = np.random.default_rng(0)  # unused: centre crops, no flips
        means, stds, shards = [], [], []
        for start in tqdm(range(0, len(data), batch), desc="latent cache"):
            entries = data.entries[start : start + batch]
            images = torch.stack([data.load(entry, rng) for entry in entries]).float() / 127.5 - 1.0
            posterior = vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        for number, first in enumerate(range(0, len(data), SHARD)):
            name = f"shard-{number:05d}.safetensors"
            save_file(
                {"mean": mean[first : first + SHARD].contiguous(), "std": std[first : first + SHARD].contiguous()},
                self.folder / name,
            )
            shards.append(name)
        index = index.model_copy(update={"shards": shards})
        write_description(self.folder / INDEX, index)
        print(f"latent cache written to {self.folder} ({len(data)} images, {len(shards)} shard(s))")
        return index

    def posterior(self, entries: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the given entries' posteriors, on `device`."""
        rows = torch.as_tensor(entries, dtype=torch.long)
        return self.mean[rows].to(device), self.std[rows].to(device)
