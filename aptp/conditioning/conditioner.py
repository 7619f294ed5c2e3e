"""What the U-Nets read: the frozen prompt encoder, through the teacher's text adapter when it has one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .adapter import TextAdapter
from .encoder import EncoderConfig, PromptEncoder
from .prompts import Conditioning


class Conditioner:
    """The frozen encoder's token states, passed through the teacher's text adapter when it has one
    (`aptp.conditioning.adapter`). The pooled embedding, the router's input, is the encoder's own.

    Parameters:
        encoder (`PromptEncoder`): the frozen encoder.
        adapter (`TextAdapter`, *optional*): the teacher's adapter, frozen; None passes the states through.
    """

    def __init__(self, encoder: PromptEncoder, adapter: TextAdapter | None = None):
        if adapter is not None and adapter.config.token_dim != encoder.token_dim:
            raise ValueError(
                f"text adapter reads {adapter.config.token_dim}-wide token states, the encoder gives "
                f"{encoder.token_dim} ({encoder.config.name}, layers {encoder.config.layers})"
            )
        self.encoder = encoder
        self.adapter = adapter.to(encoder.device).eval().requires_grad_(False) if adapter is not None else None
        self.config = encoder.config
        self.device = encoder.device
        self.embed_dim = encoder.embed_dim
        self.token_dim = adapter.config.out_dim if adapter is not None else encoder.token_dim

    @classmethod
    def from_config(
        cls,
        text_encoder: EncoderConfig | Mapping[str, Any],
        adapter: TextAdapter | None = None,
        device: str | torch.device = "cpu",
    ) -> Conditioner:
        """Load the encoder a teacher or bundle names (`text_encoder`: `EncoderConfig` or its fields) and put
        `adapter` after it: the one place a model's conditioning is assembled."""
        config = text_encoder if isinstance(text_encoder, EncoderConfig) else EncoderConfig(**text_encoder)
        return cls(PromptEncoder(config, device=device), adapter)

    # The frozen sentence encoder also makes the router's input; its cost is not counted (as before the adapter).
    text_encoder_macs_per_prompt = 0

    @property
    def router_encoder(self) -> PromptEncoder:
        """The encoder whose pooled embedding `encode` returns (the router's input)."""
        return self.encoder

    @property
    def map_channels(self) -> int:
        """Channels of the prompt map this conditioner makes (0: none)."""
        return self.adapter.config.map_channels if self.adapter is not None else 0

    @property
    def adapter_macs_per_prompt(self) -> int:
        """MACs of the adapter for one prompt (it runs over all `max_length` positions, padding masked); 0 without
        an adapter. The frozen encoder's own cost is not counted, as for a teacher without an adapter."""
        return self.adapter.macs(self.config.max_length) if self.adapter is not None else 0

    @property
    def context_length(self) -> int:
        """Tokens a U-Net reads per prompt (the key length of its cross-attention)."""
        length = self.config.max_length
        return self.adapter.context_length(length) if self.adapter is not None else length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        encoded = self.encoder.encode(prompts)
        return encoded if self.adapter is None else self.adapter(encoded)
