"""Full vs physically sliced U-Net: MAC model, FlopCounterMode and measured CPU latency, side by side in one run.

    .venv/bin/python benchmarks/slicing.py [--keep 0.5] [--batch 8] [--repeats 15] [--out benchmarks/results/slicing]

For each model shape and random architecture, the full and the sliced model run alternately on the same inputs
(so load on the machine affects both alike); the report gives median latencies and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from aptp.formats.report import collect_provenance, write_report
from pruning import ArchitectureSpace, flop_counter_macs, slice_unet

SHAPES = {
    # The embedded domain's scale: 32x32 RGB pixels, MiniLM token states (384-d), 16 tokens.
    "pixel-32": dict(
        config=dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=384,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        text_len=16,
    ),
    # SD-1.5 block layout at a quarter of the width, 32x32 latents, CLIP-length text.
    "sd15-quarter": dict(
        config=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(80, 160, 320, 320),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=192,
            attention_head_dim=8,
            norm_num_groups=16,
        ),
        text_len=77,
    ),
}


def _time_pair(full, sliced, inputs, repeats: int) -> tuple[float, float]:
    times_full, times_sliced = [], []
    with torch.inference_mode():
        for model in (full, sliced):  # warm-up
            model(*inputs)
        for _ in range(repeats):
            for model, times in ((full, times_full), (sliced, times_sliced)):
                start = time.perf_counter()
                model(*inputs)
                times.append(time.perf_counter() - start)
    return statistics.median(times_full), statistics.median(times_sliced)


def run(keep: float, batch: int, repeats: int, seeds: list[int]) -> list[dict]:
    rows = []
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**shape["config"]).eval().to(memory_format=torch.channels_last)
        text_len, resolution = shape["text_len"], shape["config"]["sample_size"]
        space = ArchitectureSpace.from_unet(unet, text_len=text_len)
        config = unet.config
        inputs = (
            torch.randn(batch, config.in_channels, resolution, resolution).to(memory_format=torch.channels_last),
            torch.randint(0, 1000, (batch,)),
            torch.randn(batch, text_len, config.cross_attention_dim),
        )
        total = space.total_macs(resolution)
        counted_total = flop_counter_macs(unet, resolution, text_len)
        for seed in seeds:
            arch = space.random(keep, seed)
            sliced = slice_unet(unet, space, arch).to(memory_format=torch.channels_last)
            modelled = space.macs(arch, resolution)
            counted = flop_counter_macs(sliced, resolution, text_len)
            t_full, t_sliced = _time_pair(unet, sliced, inputs, repeats)
            rows.append(
                {
                    "shape": name,
                    "seed": seed,
                    "keep": keep,
                    "batch": batch,
                    "params_full": sum(p.numel() for p in unet.parameters()),
                    "params_sliced": sum(p.numel() for p in sliced.parameters()),
                    "gmacs_full": total / 1e9,
                    "gmacs_sliced": modelled / 1e9,
                    "mac_ratio_model": total / modelled,
                    "mac_ratio_flop_counter": counted_total / counted,
                    "model_vs_counter_rel_error": abs(modelled - counted) / counted,
                    "latency_full_s": t_full,
                    "latency_sliced_s": t_sliced,
                    "speedup": t_full / t_sliced,
                }
            )
            print(
                f"{name:<13} seed {seed}: {total / 1e9:.3f} -> {modelled / 1e9:.3f} GMACs "
                f"(x{rows[-1]['mac_ratio_model']:.2f} model, x{rows[-1]['mac_ratio_flop_counter']:.2f} counter), "
                f"batch {batch}: {t_full * 1e3:.1f} ms -> {t_sliced * 1e3:.1f} ms (x{rows[-1]['speedup']:.2f})",
                flush=True,
            )
    return rows


def write(rows: list[dict], out: Path, config: dict) -> None:
    figures = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    lines = [
        f"Full vs sliced U-Net at keep {rows[0]['keep']} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch {rows[0]['batch']}, CPU).",
        "",
        "| shape | seed | params full -> sliced | GMACs full -> sliced | MAC ratio (model / counter) "
        "| latency full -> sliced (ms) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['seed']} | {r['params_full'] / 1e6:.2f}M -> {r['params_sliced'] / 1e6:.2f}M "
            f"| {r['gmacs_full']:.3f} -> {r['gmacs_sliced']:.3f} "
            f"| {r['mac_ratio_model']:.2f} / {r['mac_ratio_flop_counter']:.2f} "
            f"| {r['latency_full_s'] * 1e3:.1f} -> {r['latency_sliced_s'] * 1e3:.1f} | {r['speedup']:.2f}x |"
        )
    write_report(out, "slicing", figures, "\n".join(lines) + "\n", provenance=collect_provenance(config=config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "slicing")
    args = parser.parse_args()
    rows = run(args.keep, args.batch, args.repeats, args.seeds)
    write(rows, args.out, {k: getattr(args, k) for k in ("keep", "batch", "repeats", "seeds")})
    print(f"wrote {args.out / 'slicing.json'} and {args.out / 'slicing.md'}")


if __name__ == "__main__":
    main()
