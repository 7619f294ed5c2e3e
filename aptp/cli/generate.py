"""`aptp generate`: images for one prompt from a bundle or teacher folder, as one PNG row."""

from __future__ import annotations

import argparse
import sys

from aptp.formats.kinds import DEFAULT_BUNDLE

from .args import load_pipeline, positive_int

# The request field each option fills: the server's request schema checks them, so the two accept the same values.
OPTION_OF_FIELD = {
    "prompt": "prompt",
    "num_images": "--num-images",
    "steps": "--steps",
    "guidance_scale": "--guidance",
    "seed": "--seed",
}


def request_problem(args: argparse.Namespace) -> str | None:
    """What the server's `GenerateRequest` refuses in these arguments, naming the option; None when it takes them."""
    from pydantic import ValidationError

    from server.schemas import GenerateRequest, seed_problem

    fields = {"prompt": args.prompt, "num_images": args.num_images, "steps": args.steps, "seed": args.seed}
    try:
        GenerateRequest(**fields, guidance_scale=args.guidance)
    except ValidationError as e:
        problem = e.errors()[0]
        return f"{OPTION_OF_FIELD.get(str(problem['loc'][0]), problem['loc'][0])}: {problem['msg']}"
    seeds = seed_problem(args.seed, args.num_images)
    return None if seeds is None else f"--seed: {seeds}"


def _generate(args: argparse.Namespace) -> int:
    problem = request_problem(args)
    if problem is not None:
        print(f"aptp generate: error: {problem}", file=sys.stderr)
        return 2
    from PIL import Image

    pipeline = load_pipeline("generate", args.bundle, args.device)
    if pipeline is None:
        return 2
    seeds = [args.seed + i for i in range(args.num_images)]
    result = pipeline.run([args.prompt] * args.num_images, seeds, steps=args.steps, guidance_scale=args.guidance)
    images = result.images
    row = images.permute(2, 0, 3, 1).reshape(images.shape[2], -1, 3).numpy()  # (H, N * W, 3)
    picture = Image.fromarray(row)
    picture = picture.resize((picture.width * args.scale, picture.height * args.scale), Image.Resampling.NEAREST)
    picture.save(args.out)
    code = result.codes[0]
    macs = pipeline.codes[code].macs
    print(
        f"wrote {args.out} ({args.num_images} image(s), seeds {seeds[0]}..{seeds[-1]}; code {code}, "
        f"{macs / 1e9:.3f} GMACs per U-Net call = {macs / pipeline.teacher_macs:.2f} x teacher)"
    )
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="generate images for one prompt")
    generate.add_argument("prompt")
    generate.add_argument(
        "--bundle", default=str(DEFAULT_BUNDLE), help=f"bundle or teacher folder (default: {DEFAULT_BUNDLE}, as served)"
    )
    generate.add_argument("--out", required=True, help="PNG file (one row of images)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's)")
    generate.add_argument("--guidance", type=float, help="guidance scale, 1 to 50 (default: the model's)")
    generate.add_argument("--num-images", type=positive_int, default=1)
    generate.add_argument("--scale", type=positive_int, default=4, help="nearest-neighbour upscaling for viewing")
    generate.add_argument("--device", default="cpu")
    generate.set_defaults(handler=_generate)
