"""The teacher's trainable text adapter: a small transformer over the frozen prompt encoder's token states.

A frozen sentence encoder's token states do not tell one cross-attention read which attributes belong to which
object ("a red circle top left and a blue square bottom right": `benchmarks/binding.py` measures a single-head read
per grid cell at about chance on the frozen states, and at 99% after two trainable layers). The adapter is trained
with the teacher, then frozen and shared by every expert (it is not pruned), and it runs once per prompt, not once
per U-Net call, so its cost is per image, not per sampling step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from .files import ModelFileError, file_sha256, load_matching_state, read_json_object, stored_tensor

TEXT_ADAPTER = "text_adapter"  # its folder in a teacher folder and in a bundle
ADAPTER_CONFIG = "config.json"
ADAPTER_WEIGHTS = "model.safetensors"


class TextAdapterConfig(BaseModel):
    """Shape of the adapter: `token_dim` (the encoder's token-state width) in, `layers` pre-norm transformer layers
    of `width` and `heads` heads. With `passthrough`, each output token is the encoder's state followed by the
    adapter's (the U-Net keeps every word's own state and gains the adapter's), else the adapter's alone;
    `out_dim` is the U-Net's `cross_attention_dim`."""

    model_config = ConfigDict(extra="forbid")

    token_dim: int = Field(ge=1)
    width: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    passthrough: bool = False

    @property
    def out_dim(self) -> int:
        return self.width + (self.token_dim if self.passthrough else 0)


class TextAdapter(nn.Module):
    def __init__(self, config: TextAdapterConfig):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"text adapter: width {config.width} is not a multiple of heads {config.heads}")
        self.config = config
        self.project = nn.Linear(config.token_dim, config.width)
        layer = nn.TransformerEncoderLayer(
            config.width, config.heads, 4 * config.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`tokens` `(B, L, token_dim)` and `mask` `(B, L)` (1 = a real token) -> `(B, L, out_dim)`. Padding is
        masked out of attention (and the adapter's outputs there are zero), so a prompt's states do not depend on how
        far it was padded or on its batch."""
        states = self.layers(self.project(tokens), src_key_padding_mask=~mask.bool())
        states = self.norm(states) * mask.unsqueeze(-1).to(states.dtype)
        return torch.cat([tokens, states], dim=-1) if self.config.passthrough else states

    def macs(self, length: int) -> int:
        """Multiply-accumulates for one prompt of `length` tokens (projections, attention, feed-forward)."""
        width, token_dim = self.config.width, self.config.token_dim
        per_layer = length * (4 * width * width + 2 * width * 4 * width) + 2 * length * length * width
        return length * token_dim * width + self.config.layers * per_layer

    def save(self, folder: str | Path, storage_dtype: torch.dtype = torch.float32) -> dict[str, str]:
        """Write config and weights to `folder`; returns each file's sha256 by name."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(self.config.model_dump(), indent=1) + "\n")
        save_file({k: stored_tensor(v, storage_dtype) for k, v in self.state_dict().items()}, folder / ADAPTER_WEIGHTS)
        return {name: file_sha256(folder / name) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", sha256: str | None = None) -> TextAdapter:
        folder = Path(folder)
        try:
            config = TextAdapterConfig(**read_json_object(folder / ADAPTER_CONFIG))
        except ValueError as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(folder / ADAPTER_CONFIG, f"not a text adapter config ({e})") from None
        adapter = cls(config).to(device)
        state = load_matching_state(folder / ADAPTER_WEIGHTS, adapter.state_dict(), sha256, device)
        adapter.load_state_dict(state, strict=True)
        return adapter.eval().requires_grad_(False)
