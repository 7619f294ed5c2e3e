"""The teacher's trainable text adapter: a small transformer over the frozen prompt encoder's token states.

A frozen sentence encoder's token states do not tell one cross-attention read which attributes belong to which
object ("a red circle top left and a blue square bottom right": `benchmarks/binding.py` measures a single-head read
per grid cell at about chance on the frozen states, and at 99% after two trainable layers). The adapter is trained
with the teacher, then frozen and shared by every expert (it is not pruned), and it runs once per prompt, not once
per U-Net call, so its cost is per image, not per sampling step.

With `summary_tokens`, the adapter also ends in a few learned queries that each read its states once (as
`AttentionRead`); their results are appended to the prompt's tokens. A U-Net pixel then finds "what is drawn here"
in one token (the one whose query stands for its place) rather than by weighing every word of the prompt; the
teacher's training can supervise what each summary token holds (`training.layout`).

With `map_grid`, the first `map_grid**2` summary tokens also stand for the cells of a coarse grid over the image,
row by row: each is projected to `map_channels` values, and the resulting `(map_channels, grid, grid)` prompt map is
stretched over the image and fed to the U-Net as input channels (`aptp.sampling.denoise`). A pixel then gets
what the prompt says about its place as an input, instead of having to find the token that says it: on this
project's domain, U-Nets reading the summary tokens through cross-attention alone still swapped colours between
objects (docs/experiments.md, the teacher).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save_file
from torch import nn

from aptp.formats.files import ModelFileError, file_sha256, load_matching_state, read_json_object, stored_tensor

from .prompts import Conditioning

TEXT_ADAPTER = "text_adapter"  # its folder in a teacher folder and in a bundle
ADAPTER_CONFIG = "config.json"
ADAPTER_WEIGHTS = "model.safetensors"


class AttentionRead(nn.Module):
    """`queries` learned queries, each reading the tokens once (single head, padding masked): `(B, L, D)` ->
    `(B, queries, width)`."""

    def __init__(self, token_dim: int, queries: int, width: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.1)
        self.key = nn.Linear(token_dim, width)
        self.value = nn.Linear(token_dim, width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("qd,bld->bql", self.queries, self.key(tokens)) / self.queries.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask.bool()[:, None, :], float("-inf")).softmax(-1)
        return torch.einsum("bql,bld->bqd", weights, self.value(tokens))

    def macs(self, length: int) -> int:
        width, token_dim = self.queries.shape[1], self.key.in_features
        return 2 * length * token_dim * width + 2 * self.queries.shape[0] * length * width


class AdapterShape(BaseModel):
    """The adapter's own shape, whatever encoder feeds it: `layers` pre-norm transformer layers of `width` and
    `heads` heads. With `passthrough`, each output token is the encoder's state followed by the adapter's (the U-Net
    keeps every word's own state and gains the adapter's), else the adapter's alone. `summary_tokens` learned-query
    tokens follow the prompt's (their encoder part zero under `passthrough`). `map_grid` > 0 makes a
    `map_channels`-deep prompt map of the first `map_grid**2` summary tokens (the U-Net then takes `map_channels`
    more input channels). A teacher's training config (`training.teacher.AdapterSettings`) extends it."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    passthrough: bool = False
    summary_tokens: int = Field(0, ge=0)
    map_grid: int = Field(0, ge=0)
    map_channels: int = Field(0, ge=0)

    def adapter_config(self, token_dim: int) -> TextAdapterConfig:
        """This shape fed by an encoder of `token_dim`-wide token states."""
        return TextAdapterConfig(token_dim=token_dim, **self.model_dump(include=set(AdapterShape.model_fields)))


class TextAdapterConfig(AdapterShape):
    """An `AdapterShape` with `token_dim` (the encoder's token-state width) in; `out_dim` is the U-Net's
    `cross_attention_dim`."""

    token_dim: int = Field(ge=1)

    @model_validator(mode="after")
    def _map_needs_summary_tokens(self) -> TextAdapterConfig:
        if bool(self.map_grid) != bool(self.map_channels):
            raise ValueError(f"map_grid ({self.map_grid}) and map_channels ({self.map_channels}) go together")
        if self.map_grid**2 > self.summary_tokens:
            raise ValueError(
                f"a {self.map_grid}x{self.map_grid} prompt map needs {self.map_grid**2} summary tokens, "
                f"summary_tokens is {self.summary_tokens}"
            )
        return self

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
        if config.summary_tokens:
            self.summary = AttentionRead(config.width, config.summary_tokens, config.width)
            self.summary_norm = nn.LayerNorm(config.width)
        if config.map_grid:
            self.map = nn.Linear(config.width, config.map_channels)

    def forward(self, prompts: Conditioning) -> Conditioning:
        """The encoder's `prompts` (states `(B, L, token_dim)`, mask `(B, L)`, 1 = a real token) -> the same prompts
        with states `(B, L + summary_tokens, out_dim)`, their mask, and the prompt map (None without `map_grid`); the
        pooled embedding is kept. Padding is masked out of attention (and the adapter's outputs there are zero), so a
        prompt's states do not depend on how far it was padded or on its batch."""
        tokens, mask = prompts.states, prompts.mask
        states = self.layers(self.project(tokens), src_key_padding_mask=~mask.bool())
        states = self.norm(states) * mask.unsqueeze(-1).to(states.dtype)
        if self.config.passthrough:
            states = torch.cat([tokens, states], dim=-1)
        if not self.config.summary_tokens:
            return prompts.with_states(states, mask, None)
        adapted = states[..., -self.config.width :]
        # The query is added back so that each summary token's key says which query it answers, whatever it read.
        summary = self.summary_norm(self.summary(adapted, mask) + self.summary.queries)
        prompt_map = None
        if self.config.map_grid:
            grid = self.config.map_grid
            prompt_map = self.map(summary[:, : grid * grid]).transpose(1, 2).unflatten(2, (grid, grid))
        if self.config.passthrough:
            summary = torch.cat([summary.new_zeros(*summary.shape[:2], self.config.token_dim), summary], dim=-1)
        summary_mask = mask.new_ones(mask.shape[0], self.config.summary_tokens)
        return prompts.with_states(
            torch.cat([states, summary], dim=1), torch.cat([mask, summary_mask], dim=1), prompt_map
        )

    def macs(self, length: int) -> int:
        """Multiply-accumulates for one prompt of `length` tokens (projections, attention, feed-forward, summary
        reads, prompt map)."""
        width, token_dim = self.config.width, self.config.token_dim
        per_layer = length * (4 * width * width + 2 * width * 4 * width) + 2 * length * length * width
        summary = self.summary.macs(length) if self.config.summary_tokens else 0
        prompt_map = self.config.map_grid**2 * width * self.config.map_channels
        return length * token_dim * width + self.config.layers * per_layer + summary + prompt_map

    def context_length(self, length: int) -> int:
        """Tokens the U-Net reads for prompts padded to `length`."""
        return length + self.config.summary_tokens

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
