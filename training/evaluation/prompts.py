"""`aptp eval --prompts FILE`: a model of your own scored on your own prompts, with the metrics the paper uses.

Images are generated for every prompt of a caption-only prompt file (one seed each), routed per prompt and pooled
over codes, as the paper pools them. The metrics read local weight files only, named by options (nothing is
downloaded):
- CLIP score (x100, the cosine of image and prompt embeddings, floored at 0 as torchmetrics does) with a local CLIP
  folder (`--clip`, e.g. a saved `openai/clip-vit-base-patch32`);
- CMMD (x1000, squared MMD with a Gaussian kernel of bandwidth 10 on normalised CLIP image embeddings, as its paper
  computes it) against a folder of reference images (`--reference-images`), with the same CLIP;
- FID against the reference images with torchmetrics' Inception features (`--inception`, the local weights file of
  torch-fidelity's FID Inception; needs `pip install torch-fidelity`).
A metric whose file is not given is left out and the report says which option computes it; a path that does not
hold what it should is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aptp.formats.report import Provenance, write_report
from aptp.pipeline import RoutedPipeline

from .metrics import mmd_rbf

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the normalisation CLIP was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CMMD_BANDWIDTH = 10.0


class MetricFileError(ValueError):
    """A metric's weight file or folder is missing or not what it should be; the message names it."""


class LocalClip:
    """A CLIP model read from a local folder (transformers `CLIPModel`, safetensors), with its tokenizer."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise MetricFileError(f"--clip {folder}: not a local CLIP folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True).to(device)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise MetricFileError(f"--clip {folder}: cannot load a CLIP model and tokenizer ({e})") from None
        self.model.eval().requires_grad_(False)
        self.size = int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `(N, 3, H, W)` -> normalised `(N, D)`; images are resized to CLIP's input (bicubic) first."""
        device = next(self.model.parameters()).device
        x = torch.nn.functional.interpolate(images.float() / 255, size=(self.size, self.size), mode="bicubic")
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        features = self.model.get_image_features(pixel_values=((x.clamp(0, 1) - mean) / std).to(device))
        return torch.nn.functional.normalize(_tensor(features).float().cpu(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        features = self.model.get_text_features(**tokens)
        return torch.nn.functional.normalize(_tensor(features).float().cpu(), dim=-1)


def _tensor(output) -> torch.Tensor:
    """Feature tensors, whichever output object a transformers version wraps them in."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def read_image_folder(folder: str | Path, size: int) -> torch.Tensor:
    """Every image of `folder` (recursively), RGB, resized and centre-cropped to `size`, as uint8 `(N, 3, S, S)`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise MetricFileError(f"--reference-images {folder}: no images found")
    images = []
    for path in files:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
        left, top = (image.width - size) // 2, (image.height - size) // 2
        images.append(torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size))).copy()))
    return torch.stack(images).permute(0, 3, 1, 2)


def inception_fid(reference: torch.Tensor, generated: torch.Tensor, weights: str | Path) -> float:
    """torchmetrics' FID (Inception pool features) from a local weights file."""
    weights = Path(weights)
    if not weights.is_file():
        raise MetricFileError(f"--inception {weights}: file not found")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    except ModuleNotFoundError as e:
        raise MetricFileError(f"--inception needs torch-fidelity ({e}): pip install torch-fidelity") from None
    for start in range(0, len(reference), 64):
        fid.update(reference[start : start + 64], real=True)
    for start in range(0, len(generated), 64):
        fid.update(generated[start : start + 64], real=False)
    return float(fid.compute())


def evaluate_prompts(
    pipeline: RoutedPipeline,
    prompts: list[str],
    out: str | Path,
    name: str,
    seed: int = 7,
    steps: int | None = None,
    guidance_scale: float | None = None,
    clip: LocalClip | None = None,
    reference_images: str | Path | None = None,
    inception: str | Path | None = None,
    provenance: Provenance | None = None,
) -> dict[str, Any]:
    """Generate one image per prompt (pooled over codes), score what the given files allow, and write
    `<name>.json`, `<name>.md` and `<name>_codes.png` (a row of samples per code) to `out`."""
    from .evaluate import code_grid

    # Every file is read before the first image is generated: a wrong path fails at once.
    reference = read_image_folder(reference_images, pipeline.resolution) if reference_images else None
    if inception is not None and not Path(inception).is_file():
        raise MetricFileError(f"--inception {inception}: file not found")
    seeds = [seed * 100_003 + i for i in range(len(prompts))]
    made = pipeline.run(prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    images, codes = made.images, made.codes
    macs = np.asarray([pipeline.codes[c].macs for c in codes], dtype=np.float64) / pipeline.teacher_macs
    metrics: dict[str, Any] = {}
    missing: list[str] = []
    if clip is not None:
        image_embeddings = clip.image_embeddings(images)
        similarity = (image_embeddings * clip.text_embeddings(prompts)).sum(-1)
        metrics["clip_score"] = float(100 * similarity.clamp(min=0).mean())
        if reference is not None:
            real = clip.image_embeddings(reference)
            metrics["cmmd"] = mmd_rbf(real, image_embeddings, CMMD_BANDWIDTH)
        else:
            missing.append("cmmd (--reference-images)")
    else:
        missing += ["clip_score (--clip)", "cmmd (--clip and --reference-images)"]
    if reference is not None and inception is not None:
        metrics["fid"] = inception_fid(reference, images, inception)
    else:
        missing.append("fid (--reference-images and --inception)")
    report = {
        "name": name,
        "bundle": None,
        "prompts": len(prompts),
        "seed": seed,
        "steps": steps or pipeline.default_steps,
        "resolution": pipeline.resolution,
        "num_codes": pipeline.num_codes,
        "load": {str(k): float(np.mean([c == k for c in codes])) for k in range(pipeline.num_codes)},
        "macs_ratio": float(macs.mean()),
        "metrics": metrics,
        "not_computed": missing,
        "reference_images": None if reference is None else len(reference),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid, captions = code_grid(images, codes, prompts, scale=max(1, 128 // pipeline.resolution))
    grid.save(out / f"{name}_codes.png")
    (out / f"{name}_codes.txt").write_text("\n".join(captions) + "\n")
    rows = " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or "none (see below)"
    table = (
        f"### {name}\n\n{len(prompts)} prompts, {report['steps']} steps, MACs {report['macs_ratio']:.3f} x teacher, "
        f"load per code {' / '.join(f'{v:.2f}' for v in report['load'].values())}\n\nmetrics: {rows}\n"
        + (f"\nnot computed: {', '.join(missing)}\n" if missing else "")
    )
    write_report(out, name, report, table, provenance=provenance)
    return report
