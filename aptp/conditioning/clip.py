"""A Stable Diffusion pipeline's own conditioning: its CLIP tokenizer and text encoder, read exactly as diffusers'
`StableDiffusionPipeline.encode_prompt` reads them (padded and truncated to the tokenizer's max length, the text
encoder's last hidden state, the attention mask passed only when the encoder's config asks for it; the U-Net gets
no key mask). Routing reads a separate sentence encoder, when the model has a router."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pruning.macs import meta_flop_macs

from .encoder import PromptEncoder
from .prompts import Conditioning


class ClipConditioner:
    """The tokenizer and CLIP text encoder of a diffusers pipeline, frozen.

    Parameters:
        tokenizer (`CLIPTokenizer`): the pipeline's tokenizer (`model_max_length` is the U-Net's key length).
        text_encoder (`CLIPTextModel`): the pipeline's text encoder.
        router_encoder (`PromptEncoder`, *optional*): the sentence encoder whose pooled embedding the router reads;
            None for a model without a router (one code).
    """

    adapter = None
    map_channels = 0
    adapter_macs_per_prompt = 0

    def __init__(self, tokenizer, text_encoder: nn.Module, router_encoder: PromptEncoder | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.router_encoder = router_encoder
        self.context_length = int(tokenizer.model_max_length)
        self.token_dim = int(text_encoder.config.hidden_size)
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        ids = (1, self.context_length)
        self.text_encoder_macs_per_prompt = meta_flop_macs(
            text_encoder, lambda twin: twin(torch.zeros(ids, dtype=torch.long, device="meta"))
        )

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(self.device) if self.use_attention_mask else None
        states = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]  # (B, L, D)
        pooled = self.router_encoder.encode(prompts).pooled if self.router_encoder is not None else None
        return Conditioning(states=states, mask=None, pooled=pooled)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClipConditioner:
        self.text_encoder.to(device=device, dtype=dtype)
        return self
