"""Helpers for the test suite: tiny diffusers U-Net configs, random-weight models, a tiny teacher folder, and a
shared prompt encoder. Test modules import them as `from tests.helpers import ...`; fixtures live in `conftest.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

REPO = Path(__file__).resolve().parents[1]

UNET_CONFIGS = REPO / "configs" / "unets"

# Cross-attention key length used with the tiny models: short, and different from every channel count.
TEXT_LEN = 5

SMALL_RESOLUTION = 16

SD_RESOLUTION = 8  # the SD-shaped models downsample 3 times: 8 -> 4 -> 2 -> 1


def small_unet_config(**overrides: Any) -> dict[str, Any]:
    """A tiny `UNet2DConditionModel` config (~2.5 M parameters, two cross-attention levels, 8 GroupNorm groups)."""
    config: dict[str, Any] = {
        "sample_size": SMALL_RESOLUTION,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 48,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    config.update(overrides)
    return config


def load_unet_config(name: str) -> dict[str, Any]:
    """A config from `configs/unets/<name>/config.json`, without its `_`-prefixed bookkeeping keys."""
    config = json.loads((UNET_CONFIGS / name / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def sd15_like_config(**overrides: Any) -> dict[str, Any]:
    """SD 1.5's U-Net shrunk for CPU tests (~9.6 M parameters, ~25 ms per batch-1 call at 8x8).

    Kept from SD 1.5: block types, layers per block, `attention_head_dim=8` (8 heads in every block), conv
    `proj_in/proj_out` (no linear projection), 32 GroupNorm groups, 4 in/out channels.
    Shrunk: `block_out_channels` (320, 640, 1280, 1280) -> (64, 128, 128, 128): the smallest widths divisible by
    32 groups and 8 heads that keep a width change between blocks (so down blocks have a `conv_shortcut` and up
    blocks concatenate skips of different widths) and GroupNorm groups of more than one channel (2 and 4), so the
    group statistics matter. `cross_attention_dim` 768 -> 32, `sample_size` 64 -> 8.
    """
    config = load_unet_config("sd-1.5")
    config.update(
        block_out_channels=[64, 128, 128, 128], cross_attention_dim=32, sample_size=SD_RESOLUTION, norm_num_groups=32
    )
    config.update(overrides)
    return config


def sd21_like_config(**overrides: Any) -> dict[str, Any]:
    """SD 2.1's U-Net shrunk for CPU tests (~26 M parameters, ~40 ms per batch-1 call at 8x8).

    Kept from SD 2.1: block types, layers per block, `attention_head_dim=[5, 10, 20, 20]` (per-block head COUNTS),
    `use_linear_projection`, `upcast_attention`, 32 GroupNorm groups, 4 in/out channels.
    Shrunk: `block_out_channels` (320, 640, 1280, 1280) -> (160, 160, 160, 160): every width must be divisible by
    lcm(32 groups, 5 / 10 / 20 heads) = 160, so this is the smallest that builds (head dims 32, 16, 8, 8; GroupNorm
    groups of 5 channels). `cross_attention_dim` 1024 -> 48, `sample_size` 96 -> 8.
    """
    config = load_unet_config("sd-2.1")
    config.update(
        block_out_channels=[160, 160, 160, 160], cross_attention_dim=48, sample_size=SD_RESOLUTION, norm_num_groups=32
    )
    config.update(overrides)
    return config


def randomise_norms(unet: nn.Module, seed: int = 0) -> nn.Module:
    """Give every GroupNorm/LayerNorm a random affine transform (weight ~ N(1, 0.5), bias ~ N(0, 0.5)), so that a
    gate or slice applied to the wrong channels cannot hide behind identity norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, nn.GroupNorm | nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(1.0 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                if module.bias is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
    return unet


def build_unet(config: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    """A random-weight U-Net on CPU in eval mode, with randomised norm affine parameters."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    return randomise_norms(unet, seed + 1).eval()


def meta_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    """The U-Net on the `meta` device: structure only, no memory, no compute."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def unet_inputs(
    unet: nn.Module, batch: int, resolution: int, text_len: int = TEXT_LEN, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random `(sample, timesteps, encoder_hidden_states)` with a distinct timestep per sample."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    sample = torch.randn(batch, config.in_channels, resolution, resolution, generator=generator)
    timesteps = torch.randperm(1000, generator=generator)[:batch]
    context = torch.randn(batch, text_len, config.cross_attention_dim, generator=generator)
    return sample, timesteps, context


def run(unet: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One U-Net call without autograd; returns the predicted noise."""
    sample, timesteps, context = inputs
    with torch.no_grad():
        return unet(sample, timesteps, encoder_hidden_states=context).sample


def assert_same_output(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """max |actual - expected| <= rel * max(1, max |expected|)."""
    assert actual.shape == expected.shape
    bound = rel * max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= bound, f"max abs difference {diff:.3e} exceeds {bound:.3e}"


def assert_json_or_safetensors(files: list[Path]) -> None:
    """Every file parses as what its suffix says, JSON or safetensors: nothing a loader could unpickle. (Checking
    the first byte for pickle's 0x80 opcode is not enough: a safetensors header of 0x..80 bytes starts with it.)"""
    from safetensors import safe_open

    assert files
    assert {p.suffix for p in files} <= {".json", ".safetensors"}, files
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), framework="pt") as weights:
                assert list(weights.keys()), path


# ------------------------------------------------------------------------------------- the embedded shapes domain
ENCODER_MAX_LENGTH = 40  # the teacher's text_encoder.max_length (configs/shapes/teacher.yaml)

# The smallest teacher U-Net that builds: widths divisible by 4 GroupNorm groups and by 2-channel heads.
# Like the shipped teacher, the tiny one takes the two coordinate planes after its RGB input (aptp.sampling).
TINY_TEACHER_UNET: dict[str, Any] = {
    "block_out_channels": [8, 16, 16],
    "norm_num_groups": 4,
    "attention_head_dim": 2,
    "in_channels": 5,
    "out_channels": 3,
}


def tiny_teacher_config(tmp_path: Path, **overrides: Any):
    """A `TeacherConfig` that trains a ~0.2 M parameter U-Net on batches of 4 in a fraction of a second per step,
    with its run and export folders under `tmp_path`. `overrides` are top-level fields; `optim` is merged."""
    from training.teacher import TeacherConfig

    optim = {"steps": 2, "batch_size": 4, "warmup_steps": 1, **overrides.pop("optim", {})}
    data: dict[str, Any] = {
        "out": str(tmp_path / "run"),
        "export": str(tmp_path / "teacher"),
        "threads": None,
        "log_every": 1,
        "checkpoint_minutes": 60.0,
        "unet": {**TINY_TEACHER_UNET, "sample_size": 32},
        "text_encoder": {"name": "all-MiniLM-L6-v2", "max_length": ENCODER_MAX_LENGTH},
        "optim": optim,
        "sampling": {"steps": 2, "guidance_scale": 4.0},
    }
    data.update(overrides)
    return TeacherConfig.model_validate(data)


def shared_encoder_factory(encoder):
    """A stand-in for the `PromptEncoder` class that hands out `encoder` whenever its config is asked for (and builds
    any other config for real), so a test session loads all-MiniLM-L6-v2 once. Install it with
    `monkeypatch.setattr("<module>.PromptEncoder", shared_encoder_factory(encoder))`."""
    from aptp.conditioning.encoder import PromptEncoder

    def factory(config=None, device="cpu"):
        if config is not None and config == encoder.config and torch.device(device) == encoder.device:
            return encoder
        return PromptEncoder(config, device=device)

    return factory


def tiny_teacher_unet_config(**overrides: Any) -> dict[str, Any]:
    """The tiny teacher U-Net (`TINY_TEACHER_UNET` widths, ~0.3 M parameters): 32x32 RGB, cross-attending to
    all-MiniLM-L6-v2 token states (384-d)."""
    config = small_unet_config(**TINY_TEACHER_UNET, sample_size=32, cross_attention_dim=384)
    config.update(overrides)
    return config


def pixel_unet_config(sample_size: int = 32, cross_attention_dim: int = 384, **overrides: Any) -> dict[str, Any]:
    """The embedded teacher's layout (one layer per block, cross-attention at the two lower resolutions) at the
    `TINY_TEACHER_UNET` widths."""
    config: dict[str, Any] = {
        **TINY_TEACHER_UNET,
        "sample_size": sample_size,
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": cross_attention_dim,
    }
    config.update(overrides)
    return config


def tiny_teacher_spec(resolution: int = 32):
    """A `TeacherSpec` for the tiny teacher: v-prediction cosine schedule, all-MiniLM-L6-v2 with 40 tokens."""
    from diffusers import DDPMScheduler

    from aptp.formats.teacher import TeacherSpec

    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return TeacherSpec(
        resolution=resolution,
        text_encoder={"name": "all-MiniLM-L6-v2", "max_length": ENCODER_MAX_LENGTH},
        scheduler_config=dict(scheduler.config),
        sampling={"steps": 2, "guidance_scale": 4.0},
    )


def save_tiny_teacher(
    folder: Path, seed: int = 0, adapter_width: int | None = None, summary_tokens: int = 0, map_channels: int = 0
) -> Path:
    """Write a teacher folder holding a random tiny teacher U-Net (float32 weights); returns `folder`. With
    `adapter_width`, the U-Net reads all-MiniLM-L6-v2's states through a random one-layer text adapter of that
    width, ending in `summary_tokens` summary tokens; with `map_channels`, the first four of them make a 2x2 prompt
    map that the U-Net takes as input channels, after coordinate planes."""
    from aptp.conditioning.adapter import TextAdapter, TextAdapterConfig
    from aptp.formats.teacher import save_teacher

    if adapter_width is None:
        return save_teacher(build_unet(tiny_teacher_unet_config(), seed=seed), tiny_teacher_spec(), folder)
    torch.manual_seed(seed)
    config = TextAdapterConfig(
        token_dim=384,
        width=adapter_width,
        layers=1,
        heads=4,
        summary_tokens=summary_tokens,
        map_grid=2 if map_channels else 0,
        map_channels=map_channels,
    )
    adapter = TextAdapter(config)
    inputs = {"in_channels": 3 + 2 + map_channels} if map_channels else {}
    unet = build_unet(tiny_teacher_unet_config(cross_attention_dim=adapter_width, **inputs), seed=seed)
    return save_teacher(unet, tiny_teacher_spec(), folder, text_adapter=adapter)


# ------------------------------------------------------------------------------------------- servers in a process
def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll `condition()` until it holds; fail after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def wait_until_ready(process, url: str, timeout_s: float = 120.0) -> None:
    """Poll `url/readyz` until it answers 200; fail with the server's output if it exits or `timeout_s` passes."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.stdout.read().decode()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server not ready in {timeout_s:.0f} s"
        time.sleep(0.2)


# ------------------------------------------------------------------------------ APTP on the tiny SD pipeline
def search_settings(tiny_sd, tiny_captions, out, **overrides) -> dict:
    """A few steps of phase 1 on the tiny pipeline and caption folder (the settings, for a config file or a model)."""
    return {
        "teacher": str(tiny_sd),
        "data": {"folder": str(tiny_captions)},
        "out": str(out),
        "steps": 4,
        "batch_size": 4,
        "num_codes": 2,
        "warmup_fraction": 0.5,
        "lr": 1e-2,
        "log_every": 1,
        "balance_prompts": 12,
        "checkpoint_minutes": 60.0,
        **overrides,
    }


def stop_process(process, timeout_s: float = 30.0) -> None:
    """SIGTERM a child process that is still running, then SIGKILL it if it has not exited within `timeout_s`."""
    import subprocess

    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def native_thread_name(native_id: int) -> str:
    """The name Linux gives a thread of this process (`/proc/self/task/<id>/comm`)."""
    with open(f"/proc/self/task/{native_id}/comm") as comm:
        return comm.read().strip()
