"""Build a tiny random-weight Stable Diffusion pipeline folder offline, the way a user's fine-tuned model is saved
(`StableDiffusionPipeline.save_pretrained`: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).

It has SD's layout at a toy size (a 4-channel latent U-Net with cross-attention, a KL VAE with 4x downsampling, a
CLIP text encoder and a CLIP BPE tokenizer over a small vocabulary), so every code path a real SD 1.x/2.x folder
takes runs in a second on a CPU. Its images are noise: it is for checking the serving path, not for looking at.

    .venv/bin/python -m scripts.tiny_sd runs/tiny-sd [--captions runs/tiny-captions] [--prediction-type v_prediction]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# A byte-level BPE vocabulary: every printable byte as a symbol (so any text tokenizes), a few merges, and the
# start/end tokens CLIP uses. The token for a byte is the character GPT-2's byte-to-unicode table maps it to.
_MERGES = ["r e", "e d</w>", "c i", "ci r", "cir c", "l e</w>", "b l", "u e</w>", "s q", "a r", "t h", "th e</w>"]
MAX_LENGTH = 16  # the tokenizer's model_max_length (SD's is 77)


def _byte_symbols() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    for merge in _MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split()) for merge in _MERGES]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def build_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write the tiny pipeline to `folder` with safetensors weights; returns `folder`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random-weight CLIP model (text and vision towers) with the tiny tokenizer, saved as `aptp eval --clip`
    reads a local CLIP folder; returns `folder`. Its scores mean nothing: it is for trying the metrics path."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Path(folder)


CAPTION_WORDS = ("red", "blue", "green", "circle", "square", "bicycle", "tree", "house", "at night", "in the snow")


def build_tiny_captions(folder: str | Path, count: int = 12, seed: int = 0) -> Path:
    """An image-caption folder as users keep one (`metadata.jsonl` with `file_name` and `text`, images in a
    subfolder): `count` random RGB images of assorted sizes and aspect ratios (so resizing and cropping run), with
    short captions. Returns `folder`."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        height, width = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        name = f"images/{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(folder / name)
        words = rng.choice(CAPTION_WORDS, size=3, replace=False)
        lines.append(json.dumps({"file_name": name, "text": f"a {' '.join(words)}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the pipeline folder")
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions", help="also write a tiny image-caption folder (12 images) here")
    parser.add_argument("--clip", help="also write a tiny random CLIP folder here (for aptp eval --clip)")
    args = parser.parse_args(argv)
    folder = build_tiny_sd(args.folder, args.prediction_type, args.seed)
    index = json.loads((folder / "model_index.json").read_text())
    print(f"wrote {folder} ({index['_class_name']}: {', '.join(k for k in index if not k.startswith('_'))})")
    if args.captions:
        print(f"wrote {build_tiny_captions(args.captions, seed=args.seed)} (12 captioned images)")
    if args.clip:
        print(f"wrote {build_tiny_clip(args.clip, seed=args.seed)} (a tiny random CLIP model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
