"""What the prompt encoder costs a request, and what the two ways to make it cheaper do to it: the encoder eager,
compiled (`torch.compile`) and with its linear layers quantized to int8 (`torch.ao.quantization.quantize_dynamic`),
side by side in one run.

    .venv/bin/python benchmarks/encoder.py [--bundle benchmarks/models/aptp-rich-0.4] [--threads 1]
        [--out benchmarks/results/serving] [--name encoder]

Encoding is most of the routing stage (the serving issue's "routing at most 2% of end-to-end time": the routing stage
is about 3%, of which choosing the code is 0.1%), and the U-Nets need it as well, so it can only get cheaper, not
leave. Each variant encodes the same prompts (the template test captions and the paraphrase set) with the bundle's
own conditioning (encoder and text adapter) on `--threads` threads, as the server's routing thread does, at batch 1
and 8, alternating within each repetition. Beside the time: how far each variant's token states (what the U-Nets read)
and sentence embeddings (what the router reads) are from the eager ones, relative L2 per prompt, worst over the
prompts, and the share of prompts the router sends to another code.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from aptp.conditioning.prompts import Conditioning  # noqa: E402
from aptp.formats.report import collect_provenance, write_report  # noqa: E402
from aptp.pipeline import RoutedPipeline  # noqa: E402
from training.evaluation.evaluate import evaluation_samples  # noqa: E402
from training.evaluation.paraphrases import PARAPHRASE_COUNT  # noqa: E402

EAGER, COMPILED, INT8 = "eager", "compiled", "int8 linear layers"
BATCHES = (1, 8)


def _quantized(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic's deprecation notice
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


MAKERS = {EAGER: lambda model: model, COMPILED: lambda model: torch.compile(model, dynamic=True), INT8: _quantized}


def variants(pipeline: RoutedPipeline, names: tuple[str, ...] = tuple(MAKERS)) -> dict[str, object]:
    """The bundle's conditioning (`pipeline.encoder`) with its frozen sentence encoder made each of `names` ways
    (eager first: the others are held against it)."""
    conditioner = pipeline.encoder
    out = {}
    for name in names:
        variant = MAKERS[name](conditioner.encoder.model)
        encoder = copy.copy(conditioner.encoder)
        encoder.model = variant
        with_variant = copy.copy(conditioner)
        with_variant.encoder = encoder
        out[name] = with_variant
    return out


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Worst relative L2 distance over the prompts (rows) of `value` from `reference`."""
    flat, ref = value.flatten(1), reference.flatten(1)
    return ((flat - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-12)).max().item()


@torch.inference_mode()
def deviation(pipeline: RoutedPipeline, conditioners: dict[str, object], prompts: list[str]) -> dict[str, dict]:
    """Per variant: worst relative error of the token states and the sentence embeddings against eager, and the
    share of `prompts` routed to another code."""
    encoded: dict[str, Conditioning] = {name: c.encode(prompts) for name, c in conditioners.items()}
    reference = encoded[EAGER]
    codes = {name: pipeline.route(e).codes for name, e in encoded.items()}
    return {
        name: {
            "token_states_error": _relative_error(e.states, reference.states),
            "embedding_error": _relative_error(e.pooled, reference.pooled),
            "other_code_share": statistics.mean(a != b for a, b in zip(codes[name], codes[EAGER], strict=True)),
        }
        for name, e in encoded.items()
    }


@torch.inference_mode()
def encode_seconds(conditioners: dict[str, object], prompts: list[str], batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per prompt of each variant's `encode` on `batch` prompts at a time, variants alternating."""
    groups = [prompts[start : start + batch] for start in range(0, len(prompts) - batch + 1, batch)][:repeats]
    for conditioner in conditioners.values():  # first calls: compiling, and each length bucket once
        for group in groups[:4]:
            conditioner.encode(group)
    samples: dict[str, list[float]] = {name: [] for name in conditioners}
    for group in groups:
        for name, conditioner in conditioners.items():
            began = time.perf_counter()
            conditioner.encode(group)
            samples[name].append((time.perf_counter() - began) / batch)
    return {name: statistics.median(times) for name, times in samples.items()}


def run(bundle: Path, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    pipeline = RoutedPipeline.load(bundle)
    # The sets `aptp eval` scores: the template test set and the paraphrase set.
    sets = {"template test": ("test", 256), "paraphrases": ("paraphrases", PARAPHRASE_COUNT)}
    prompts = {
        name: [s.caption for s in evaluation_samples(split, count, seed=0)] for name, (split, count) in sets.items()
    }
    conditioners = variants(pipeline)
    began = time.perf_counter()
    with torch.inference_mode():
        conditioners[COMPILED].encode(prompts["template test"][:8])
    compile_s = time.perf_counter() - began
    mixed = [p for pair in zip(*prompts.values(), strict=False) for p in pair]
    return {
        "threads": threads,
        "first_compiled_call_s": compile_s,
        "seconds_per_prompt": {batch: encode_seconds(conditioners, mixed, batch, repeats) for batch in BATCHES},
        "deviation": {name: deviation(pipeline, conditioners, texts) for name, texts in prompts.items()},
        "prompts": {name: len(texts) for name, texts in prompts.items()},
    }


def table(figures: dict) -> str:
    names = list(figures["seconds_per_prompt"][BATCHES[0]])
    lines = [
        f"### Encoding a prompt ({figures['threads']} thread(s), median ms per prompt, variants alternating)",
        "",
        "| variant | "
        + " | ".join(f"batch {b}" for b in BATCHES)
        + " | "
        + " | ".join(f"x eager, batch {b}" for b in BATCHES)
        + " |",
        "|---|" + "---|" * (2 * len(BATCHES)),
    ]
    for name in names:
        times = [figures["seconds_per_prompt"][b][name] for b in BATCHES]
        eager = [figures["seconds_per_prompt"][b][EAGER] for b in BATCHES]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{t * 1e3:.2f}" for t in times)
            + " | "
            + " | ".join(f"{e / t:.2f}x" for e, t in zip(eager, times, strict=True))
            + " |"
        )
    lines += [
        "",
        f"The first compiled call (compiling) took {figures['first_compiled_call_s']:.1f} s.",
        "",
        "### Against eager: worst relative L2 error over the prompts, and prompts routed to another code",
        "",
        "| variant | prompts | token states | sentence embedding | another code |",
        "|---|---|---|---|---|",
    ]
    for prompts, by_variant in figures["deviation"].items():
        for name, d in by_variant.items():
            if name == EAGER:
                continue
            lines.append(
                f"| {name} | {prompts} ({figures['prompts'][prompts]}) | {d['token_states_error']:.2e} "
                f"| {d['embedding_error']:.2e} | {d['other_code_share']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("benchmarks/models/aptp-rich-0.4"))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (APTP_ROUTING_THREADS' default: 1)")
    parser.add_argument("--repeats", type=int, default=60, help="groups of prompts timed per batch size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving"))
    parser.add_argument("--name", default="encoder")
    args = parser.parse_args(argv)
    figures = run(args.bundle, args.threads, args.repeats)
    config = {"bundle": str(args.bundle), "threads": args.threads, "repeats": args.repeats}
    provenance = collect_provenance([args.bundle], config=config)
    write_report(args.out, args.name, figures, table(figures), echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
