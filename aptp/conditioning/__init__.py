"""What conditions a U-Net: the frozen prompt encoder (`encoder`), the teacher's trainable text adapter
(`adapter`), the `Conditioner` that chains them, and the `Conditioning` object that carries a batch of prompts
from the encoder to the U-Net (`prompts`)."""

from .adapter import TextAdapter, TextAdapterConfig
from .conditioner import Conditioner
from .encoder import EncoderConfig, PromptEncoder
from .prompts import Conditioning

__all__ = ["Conditioner", "Conditioning", "EncoderConfig", "PromptEncoder", "TextAdapter", "TextAdapterConfig"]
