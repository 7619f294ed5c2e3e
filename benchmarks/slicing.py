"""Full vs physically sliced U-Net: MAC model, FlopCounterMode and measured CPU latency, side by side in one run; and
whether latency follows MACs at the widths of the model (the serving issue's P1 and GEMM-share bars).

    .venv/bin/python benchmarks/slicing.py [--shapes pixel-32 sd15-quarter] [--keep 0.5] [--batches 1 8]
        [--seeds 0 1 2] [--repeats 15] [--seconds 60] [--out benchmarks/results/slicing] [--name slicing]
    .venv/bin/python benchmarks/slicing.py --shapes sd15 --seeds 0 --name slicing-sd15

For each model shape, random architecture and batch, the full and the sliced model run alternately on the same
inputs (so load on the machine affects both alike) as the server calls them: one guided call, 2 rows per image. The
report gives median latencies, their ratio, the GMAC/s each reaches against a 2048^3 fp32 matmul on the same threads,
and the sliced model's latency per MAC against the full model's (1.0 when time follows MACs). Each pair repeats
`--repeats` times or for about `--seconds`, whichever is less (at least 3), so that SD-1.5 widths, whose calls take
seconds, fit in minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from serving import gemm_rate  # noqa: E402

from aptp.formats.report import collect_provenance, write_report  # noqa: E402
from pruning import ArchitectureSpace, flop_counter_macs, slice_unet  # noqa: E402


def _sd15(width_divisor: int, norm_num_groups: int) -> dict:
    """SD-1.5's U-Net layout (four levels, two layers each, cross-attention in the first three) with its widths and
    text width divided by `width_divisor`, at 32x32 latents (256 px, to keep a call to seconds on a CPU) and
    CLIP-length text."""
    return dict(
        config=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=tuple(width // width_divisor for width in (320, 640, 1280, 1280)),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768 // width_divisor,
            attention_head_dim=8,
            norm_num_groups=norm_num_groups,
        ),
        text_len=77,
    )


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
    "sd15-quarter": _sd15(width_divisor=4, norm_num_groups=16),
    "sd15": _sd15(width_divisor=1, norm_num_groups=32),  # random weights
}
DEFAULT_SHAPES = ("pixel-32", "sd15-quarter")


def _call(model, inputs) -> float:
    began = time.perf_counter()
    model(*inputs)
    return time.perf_counter() - began


@torch.inference_mode()
def _time_pair(full, sliced, inputs, repeats: int, seconds: float) -> tuple[float, float, int]:
    """Median seconds of a call of each model, alternating, and how many repetitions that took."""
    pair = _call(full, inputs) + _call(sliced, inputs)  # warm-up, which also sizes the repetitions
    repeats = max(3, min(repeats, int(seconds / pair)))
    times_full, times_sliced = [], []
    for _ in range(repeats):
        times_full.append(_call(full, inputs))
        times_sliced.append(_call(sliced, inputs))
    return statistics.median(times_full), statistics.median(times_sliced), repeats


def _guided_inputs(config, text_len: int, batch: int) -> tuple[torch.Tensor, ...]:
    rows, resolution = 2 * batch, config.sample_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, config.in_channels, resolution, resolution, generator=generator)
    return (
        latents.to(memory_format=torch.channels_last),
        torch.full((rows,), 500),
        torch.randn(rows, text_len, config.cross_attention_dim, generator=generator),
    )


def run(shapes: list[str], keep: float, batches: list[int], seeds: list[int], repeats: int, seconds: float):
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**shape["config"]).eval().to(memory_format=torch.channels_last)
        text_len, resolution = shape["text_len"], shape["config"]["sample_size"]
        space = ArchitectureSpace.from_unet(unet, text_len=text_len)
        total = space.total_macs(resolution)
        counted_total = flop_counter_macs(unet, resolution, text_len)
        params_full = sum(p.numel() for p in unet.parameters())
        for seed in seeds:
            arch = space.random(keep, seed)
            sliced = slice_unet(unet, space, arch).to(memory_format=torch.channels_last)
            modelled = space.macs(arch, resolution)
            counted = flop_counter_macs(sliced, resolution, text_len)
            params_sliced = sum(p.numel() for p in sliced.parameters())
            for batch in batches:
                inputs = _guided_inputs(unet.config, text_len, batch)
                t_full, t_sliced, done = _time_pair(unet, sliced, inputs, repeats, seconds)
                rows_per_call = 2 * batch  # guided: an unconditioned and a conditioned row per image
                row = {
                    "shape": name,
                    "seed": seed,
                    "keep": keep,
                    "batch": batch,
                    "repeats": done,
                    "params_full": params_full,
                    "params_sliced": params_sliced,
                    "gmacs_full": total / 1e9,
                    "gmacs_sliced": modelled / 1e9,
                    "mac_ratio_model": total / modelled,
                    "mac_ratio_flop_counter": counted_total / counted,
                    "model_vs_counter_rel_error": abs(modelled - counted) / counted,
                    "latency_full_s": t_full,
                    "latency_sliced_s": t_sliced,
                    "speedup": t_full / t_sliced,
                    "gmacs_per_s_full": rows_per_call * total / t_full / 1e9,
                    "gmacs_per_s_sliced": rows_per_call * modelled / t_sliced / 1e9,
                    # > 1: the sliced model takes longer per MAC than the full one (fixed costs, narrow kernels).
                    "latency_per_mac_x_full": (total / modelled) / (t_full / t_sliced),
                }
                rows.append(row)
                print(
                    f"{name:<13} seed {seed} batch {batch:>2}: {total / 1e9:.3f} -> {modelled / 1e9:.3f} GMACs a row "
                    f"(x{row['mac_ratio_model']:.2f} model, x{row['mac_ratio_flop_counter']:.2f} counter), "
                    f"{t_full * 1e3:.1f} ms -> {t_sliced * 1e3:.1f} ms (x{row['speedup']:.2f}), "
                    f"{row['gmacs_per_s_full']:.1f} / {row['gmacs_per_s_sliced']:.1f} GMAC/s, "
                    f"latency per MAC x{row['latency_per_mac_x_full']:.2f}",
                    flush=True,
                )
            del sliced  # freed before the next is built: SD-1.5's copies take gigabytes
        del unet
    return rows


def write(rows: list[dict], gemm: float, out: Path, name: str, config: dict) -> None:
    figures = {"torch": torch.__version__, "threads": torch.get_num_threads(), "gemm_gmacs_per_s": gemm, "rows": rows}
    lines = [
        f"Full vs sliced U-Net at keep {rows[0]['keep']} (torch {torch.__version__}, {torch.get_num_threads()} "
        "threads, CPU): one guided call (2 rows per image), the two models alternating. GEMM (2048^3 fp32) on the "
        f"same threads: {gemm:.1f} GMAC/s.",
        "",
        "| shape | seed | batch | params full -> sliced | GMACs a row full -> sliced | MAC ratio (model / counter) "
        "| latency full -> sliced (ms) | speed-up | latency per MAC x full | GMAC/s full / sliced | full / GEMM "
        "| repeats |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['seed']} | {r['batch']} "
            f"| {r['params_full'] / 1e6:.2f}M -> {r['params_sliced'] / 1e6:.2f}M "
            f"| {r['gmacs_full']:.3f} -> {r['gmacs_sliced']:.3f} "
            f"| {r['mac_ratio_model']:.2f} / {r['mac_ratio_flop_counter']:.2f} "
            f"| {r['latency_full_s'] * 1e3:.1f} -> {r['latency_sliced_s'] * 1e3:.1f} | {r['speedup']:.2f}x "
            f"| {r['latency_per_mac_x_full']:.2f}x | {r['gmacs_per_s_full']:.1f} / {r['gmacs_per_s_sliced']:.1f} "
            f"| {r['gmacs_per_s_full'] / gemm:.2f} | {r['repeats']} |"
        )
    write_report(out, name, figures, "\n".join(lines) + "\n", provenance=collect_provenance(config=config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(DEFAULT_SHAPES))
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="images per guided call")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=60.0, help="about how long each pair of models repeats")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "slicing")
    parser.add_argument("--name", default="slicing")
    args = parser.parse_args()
    gemm = gemm_rate()
    rows = run(args.shapes, args.keep, args.batches, args.seeds, args.repeats, args.seconds)
    keys = ("shapes", "keep", "batches", "repeats", "seconds", "seeds")
    write(rows, gemm, args.out, args.name, {key: getattr(args, key) for key in keys})
    print(f"wrote {args.out / args.name}.json and .md")


if __name__ == "__main__":
    main()
