"""Diffusers pipeline folders, read as they are: what `StableDiffusionPipeline.save_pretrained` writes.

```
pipeline/
  model_index.json           the pipeline class and, per component, its library and class
  unet/                      UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
  vae/                       AutoencoderKL
  text_encoder/              CLIPTextModel (config.json + model.safetensors)
  tokenizer/                 CLIPTokenizer (vocab.json + merges.txt, or tokenizer.json)
  scheduler/                 scheduler_config.json (the training noise schedule, prediction type included)
```
SD 1.x and 2.x have this layout (`epsilon` or `v_prediction`, as the scheduler config says). Anything else is refused
before a weight is read, with a message naming the component and what is supported: SDXL and its added
conditioning (a second text encoder, time ids), other text encoders, inpainting or depth U-Nets (extra input
channels), class or added embeddings. Weights are read from safetensors only (a folder with `.bin` files alone is
refused: they are pickles). A safety checker, when the folder names one, is not loaded or run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aptp.conditioning.encoder import EncoderConfig
from aptp.sampling import SamplingConfig

from .files import ModelFileError, read_json_object
from .teacher import TeacherSpec

PIPELINE_INDEX = "model_index.json"
SUPPORTED = (
    "supported: a StableDiffusionPipeline folder (SD 1.x or 2.x) with unet UNet2DConditionModel, vae AutoencoderKL, "
    "text_encoder CLIPTextModel, tokenizer CLIPTokenizer, and a diffusers scheduler"
)
# Component -> the classes accepted for it. The scheduler may be any diffusers scheduler: only its config is read.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": (),
}
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# A pipeline folder holds no sampling defaults: these are diffusers' Stable Diffusion defaults (guidance 7.5), with
# the DPM-Solver++ steps this project samples with everywhere.
STABLE_DIFFUSION_SAMPLING = SamplingConfig(steps=25, guidance_scale=7.5)
# Entries of model_index.json that are not components, or that this project leaves unused.
IGNORED = {"safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker"}


class PipelineFileError(ModelFileError):
    """A diffusers pipeline folder is unsupported, incomplete or corrupt; the message names the component."""


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


@dataclass
class StableDiffusionComponents:
    """What a Stable Diffusion pipeline folder holds, loaded.

    Parameters:
        unet (`UNet2DConditionModel`): the denoiser (latent space).
        vae (`AutoencoderKL`): turns latents into images.
        tokenizer (`CLIPTokenizer`): the text encoder's tokenizer.
        text_encoder (`CLIPTextModel`): the conditioning encoder.
        scheduler_config (`dict`): the training noise schedule.
    """

    unet: nn.Module
    vae: nn.Module
    tokenizer: Any
    text_encoder: nn.Module
    scheduler_config: dict[str, Any]


def check_pipeline_folder(folder: str | Path) -> dict[str, Any]:
    """Read `model_index.json` and every component's config, refusing what is not supported; returns the configs
    by component (no weights are read)."""
    folder = Path(folder)
    index_path = folder / PIPELINE_INDEX
    index = read_json_object(index_path, PipelineFileError)
    kind = index.get("_class_name")
    if kind != "StableDiffusionPipeline":
        extra = " (SDXL's added conditioning is not supported)" if "XL" in str(kind) else ""
        raise PipelineFileError(index_path, f"pipeline class {kind!r} is not supported{extra}; {SUPPORTED}")
    unknown = sorted(k for k in index if not k.startswith("_") and k not in COMPONENTS and k not in IGNORED)
    if unknown:
        raise PipelineFileError(index_path, f"components {unknown} are not supported; {SUPPORTED}")
    configs: dict[str, Any] = {}
    for name, classes in COMPONENTS.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise PipelineFileError(index_path, f"component {name!r} is missing; {SUPPORTED}")
        if classes and entry[1] not in classes:
            raise PipelineFileError(folder / name, f"{name} is a {entry[1]}, which is not supported; {SUPPORTED}")
        if not (folder / name).is_dir():
            raise PipelineFileError(folder / name, f"the {name} component's folder is missing")
        if name == "tokenizer":
            if not any((folder / name / f).is_file() for f in ("tokenizer.json", "vocab.json")):
                raise PipelineFileError(folder / name, "no tokenizer.json or vocab.json + merges.txt")
            continue
        config_name = "scheduler_config.json" if name == "scheduler" else "config.json"
        configs[name] = read_json_object(folder / name / config_name, PipelineFileError)
        if name in WEIGHTS and not (folder / name / f"{WEIGHTS[name]}.safetensors").is_file():
            pickled = sorted(p.name for p in (folder / name).glob("*.bin"))
            why = f" ({pickled[0]} is a pickle, which is never loaded)" if pickled else ""
            raise PipelineFileError(
                folder / name,
                f"no {WEIGHTS[name]}.safetensors{why}; re-save with save_pretrained(safe_serialization=True)",
            )
    _check_shapes(folder, configs)
    return configs


def _check_shapes(folder: Path, configs: dict[str, Any]) -> None:
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim", "time_cond_proj_dim"):
        if unet.get(key) is not None:
            raise PipelineFileError(
                folder / "unet", f"unet config sets {key}={unet[key]!r}: not supported; {SUPPORTED}"
            )
    latent = vae.get("latent_channels", 4)
    if unet.get("in_channels") != latent or unet.get("out_channels") != latent:
        raise PipelineFileError(
            folder / "unet",
            f"unet takes {unet.get('in_channels')} channels and makes {unet.get('out_channels')}, the VAE's latents "
            f"have {latent} (inpainting and depth U-Nets are not supported)",
        )
    cross = unet.get("cross_attention_dim")
    if isinstance(cross, list | tuple):
        cross = cross[0]
    if cross != text.get("hidden_size"):
        raise PipelineFileError(
            folder / "text_encoder",
            f"text encoder states are {text.get('hidden_size')} wide, the U-Net's cross-attention reads {cross}",
        )


def load_component(
    folder: Path,
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    error: type[ModelFileError] = PipelineFileError,
):
    """One component folder (`unet`, `vae`, `text_encoder` or `tokenizer`, as diffusers saves them) from
    safetensors only and without any download; models frozen on `device` as `dtype` (default float32). A file that
    cannot be read is `error` naming the folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = dtype or torch.float32
    offline = {"use_safetensors": True, "local_files_only": True}
    loaders = {
        "unet": lambda path: UNet2DConditionModel.from_pretrained(path, **offline, torch_dtype=dtype),
        "vae": lambda path: AutoencoderKL.from_pretrained(path, **offline, torch_dtype=dtype),
        "text_encoder": lambda path: CLIPTextModel.from_pretrained(path, **offline, dtype=dtype),
        "tokenizer": lambda path: CLIPTokenizer.from_pretrained(path, local_files_only=True),
    }
    if not (folder / name).is_dir():
        raise error(folder / name, f"the {name} component's folder is missing")
    try:
        loaded = loaders[name](str(folder / name))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise error(folder / name, f"cannot load the {name} ({type(e).__name__}: {e})") from None
    return loaded if name == "tokenizer" else loaded.to(device).eval().requires_grad_(False)


def load_stable_diffusion(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> StableDiffusionComponents:
    """Load a Stable Diffusion pipeline folder's components (checked first by `check_pipeline_folder`) on `device`
    as `dtype` (default float32)."""
    folder = Path(folder)
    configs = check_pipeline_folder(folder)
    parts = {name: load_component(folder, name, device, dtype) for name in ("unet", "vae", "tokenizer", "text_encoder")}
    return StableDiffusionComponents(**parts, scheduler_config=configs["scheduler"])


def pipeline_teacher_spec(
    parts: StableDiffusionComponents, router_encoder: EncoderConfig | None = None
) -> tuple[TeacherSpec, int]:
    """A pipeline's U-Net as the teacher that bundles are cut from: its spec (the latent size as resolution, the
    router's sentence encoder, the pipeline's noise schedule, Stable Diffusion's sampling defaults) and the U-Net's
    cross-attention key length (the tokenizer's max length)."""
    spec = TeacherSpec(
        resolution=int(parts.unet.config.sample_size),
        text_encoder=router_encoder or EncoderConfig(),
        scheduler_config=parts.scheduler_config,
        sampling=STABLE_DIFFUSION_SAMPLING,
    )
    return spec, int(parts.tokenizer.model_max_length)
