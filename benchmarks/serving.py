"""How close serving runs to what the codes' MACs allow: U-Net latency against MACs, the machine's GEMM rate, and
server throughput and latency at saturation, side by side in one run.

    .venv/bin/python benchmarks/serving.py --out benchmarks/results/serving/serving

Parts, each printed and written to OUT.json / OUT.md with provenance:

- **unet**: one guided U-Net call (2 rows per image) of every code and of the teacher at batch 1, 2, 4, 8 and 16,
  the models alternating within each repetition (median of `--repeats`). For each code: its latency over the
  teacher's, divided by its MAC ratio ("latency per MAC x teacher", 1.0 when time follows MACs), and the GMAC/s the
  call reaches.
- **gemm**: a 2048 x 2048 fp32 matmul on the same threads: the machine's dense rate, the U-Net's ceiling.
- **gated**: a mixed batch as per-prompt dynamic pruning runs it: the teacher with each row's code as gate masks
  (`pruning.gates.UNetGates`), against the same rows routed to their sliced experts, one batch per code.
- **server**: `aptp serve` at saturation (closed loop: `--clients` clients, each sending its next request when the
  last is answered) on a mixed prompt stream, for the bundle with whole-batch and with step-level batching, the
  bundle with batches of one, and the teacher. Throughput (images/s), latency p50/p95, and where a request's time
  went (the server's report: routing, queueing, computing; the rest of the client's latency is HTTP, JSON and PNG),
  and the engine's busy share of the run (`aptp_compute_seconds` over the wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from load import ServerProcess, free_port, percentile, wait_ready  # noqa: E402
from svg import Panel, Series, panels_svg  # noqa: E402

from aptp.conditioning.prompts import Conditioning  # noqa: E402
from aptp.formats.kinds import DEFAULT_BUNDLE  # noqa: E402
from aptp.formats.report import collect_provenance, write_report  # noqa: E402
from aptp.pipeline import RoutedPipeline  # noqa: E402
from aptp.sampling import denoise  # noqa: E402

BATCHES = (1, 2, 4, 8, 16)


# ------------------------------------------------------------------------------------------------ U-Net latency
def _guided_inputs(pipeline: RoutedPipeline, batch: int) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """What one guided step feeds a U-Net for `batch` images: 2 x batch rows of noise, timesteps and prompts."""
    prompts = pipeline.encode(["a red circle in the top left corner"] * batch)
    context = Conditioning.cat([pipeline.empty_prompt.repeat(batch), prompts]).for_unet()
    unet = pipeline.experts[0]
    size = pipeline.latent_size
    x = torch.randn(2 * batch, unet.config.out_channels, size, size, generator=torch.Generator().manual_seed(0))
    return x, torch.full((2 * batch,), 500), context


@torch.inference_mode()
def _seconds(unet, x, t, context, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        denoise(unet, x, t, context)
        times.append(time.perf_counter() - began)
    return times


def unet_latency(bundle: RoutedPipeline, teacher: RoutedPipeline, repeats: int) -> list[dict]:
    """Median guided-call seconds per model and batch, models alternating within every repetition."""
    models = [("teacher", teacher.experts[0], teacher.teacher_macs)]
    models += [(f"code {c.code}", bundle.experts[c.code], c.macs) for c in bundle.codes]
    rows = []
    for batch in BATCHES:
        x, t, context = _guided_inputs(bundle, batch)
        for _, unet, _ in models:  # warm every model at this shape first
            _seconds(unet, x, t, context, 1)
        samples: dict[str, list[float]] = {name: [] for name, _, _ in models}
        for _ in range(repeats):
            for name, unet, _ in models:
                samples[name] += _seconds(unet, x, t, context, 1)
        teacher_s = statistics.median(samples["teacher"])
        for name, _, macs in models:
            seconds = statistics.median(samples[name])
            mac_ratio = macs / teacher.teacher_macs
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "seconds": seconds,
                    "mac_ratio": mac_ratio,
                    "latency_ratio": seconds / teacher_s,
                    "latency_per_mac": (seconds / teacher_s) / mac_ratio,
                    "gmacs_per_s": macs * 2 * batch / seconds / 1e9,
                }
            )
    return rows


@torch.inference_mode()
def gemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """GMAC/s of a `size`^3 fp32 matmul (median of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - began)
    return size**3 / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------------------- per-sample gating
@torch.inference_mode()
def gated_teacher(bundle: RoutedPipeline, teacher: RoutedPipeline, batch: int, repeats: int) -> dict:
    """Seconds for one guided step of a mixed batch (`batch` images spread over the codes): the teacher gated per
    row by each row's code, against each code's rows on its sliced expert."""
    from pruning.gates import UNetGates

    codes = [i % bundle.num_codes for i in range(batch)]
    x, t, context = _guided_inputs(bundle, batch)
    architectures = bundle.router.code_architectures()
    unet = teacher.experts[0]
    gates = UNetGates(unet, bundle.router.space).attach()
    try:
        gates.set(torch.cat([architectures[codes], architectures[codes]]))  # both guidance branches
        gated = statistics.median(_seconds(unet, x, t, context, repeats))
    finally:
        gates.detach()
    sliced = 0.0
    for code in sorted(set(codes)):
        rows = [i for i, c in enumerate(codes) if c == code]
        both = rows + [batch + i for i in rows]
        sliced += statistics.median(_seconds(bundle.experts[code], x[both], t[both], context.select(both), repeats))
    return {"batch": batch, "gated_teacher_s": gated, "sliced_experts_s": sliced, "speedup": gated / sliced}


# ------------------------------------------------------------------------------------------------------ server
def _compute_seconds(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "aptp_compute_seconds_sum"
    )


async def closed_loop(url: str, prompts: list[str], clients: int, requests: int, steps: int) -> dict:
    """`clients` clients sending `requests` in all, each its next as soon as its last is answered."""
    todo = list(range(requests))
    latencies, reports = [], []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop()
            body = {"prompt": prompts[i % len(prompts)], "seed": i, "steps": steps}
            began = time.perf_counter()
            response = await client.post(f"{url}/generate", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - began)
            reports.append(response.json()["report"])

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        before = _compute_seconds((await client.get(f"{url}/metrics")).text)
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - began
        busy = _compute_seconds((await client.get(f"{url}/metrics")).text) - before
    images = sum(len(r["seeds"]) for r in reports)
    mean = {k: statistics.mean(r[k] for r in reports) for k in ("router_seconds", "queue_seconds", "total_seconds")}
    client_mean = statistics.mean(latencies)
    return {
        "requests": len(reports),
        "wall_s": wall,
        "images_per_s": images / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "mean_batch_images": statistics.mean(r["batch_images"] for r in reports),
        "mean_router_s": mean["router_seconds"],
        "mean_queue_s": mean["queue_seconds"],
        "mean_server_s": mean["total_seconds"],
        "mean_client_s": client_mean,
        "outside_server_share": (client_mean - mean["total_seconds"]) / client_mean,
        "router_share": mean["router_seconds"] / client_mean,
        "engine_busy_share": busy / wall,
    }


def serve_and_measure(
    name: str, bundle: Path, settings: dict[str, str], args, prompts: list[str], serve_args: tuple[str, ...] = ()
) -> dict:
    port = free_port()
    log = Path(args.out).with_name(f"{Path(args.out).name}-{name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {"APTP_THREADS": str(args.threads), "APTP_MAX_WAIT_MS": "50", "APTP_MAX_QUEUE_SIZE": "64", **settings}
    server = ServerProcess(bundle, port, env, log, "cpu", serve_args)
    url = f"http://127.0.0.1:{port}"
    try:

        async def run() -> dict:
            async with httpx.AsyncClient() as control:
                await wait_ready(control, url, server)
            await closed_loop(url, prompts, args.clients, args.clients, args.steps)  # warm the whole path once
            return await closed_loop(url, prompts, args.clients, args.requests, args.steps)

        result = asyncio.run(run())
    finally:
        server.stop(60)
        log.unlink(missing_ok=True)
    print(f"  {name}: {result['images_per_s']:.2f} images/s, p50 {result['latency_p50_s']:.2f} s", flush=True)
    return {"config": name, "settings": settings, **result}


# --------------------------------------------------------------------------------------------------------- main
BATCH_COLOURS = {1: "#1f77b4", 4: "#ff7f0e", 8: "#2ca02c", 16: "#d62728"}
CONFIG_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#000000", "#17becf")


def plot(figures: dict) -> str:
    """Two panels: each model's guided-call latency against its MACs, one line per batch size; and each server
    configuration's throughput against the images its batches held."""
    unet = figures["unet"]
    latency = Panel(
        "guided U-Net call (ms)",
        "MACs (x teacher)",
        (0.5, 1.05),
        [
            Series(f"batch {b}", colour, [(r["mac_ratio"], 1000 * r["seconds"]) for r in unet if r["batch"] == b])
            for b, colour in BATCH_COLOURS.items()
        ],
    )
    configs = {r["config"]: colour for r, colour in zip(figures["server"], CONFIG_COLOURS, strict=False)}
    throughput = Panel(
        "server images/s at saturation",
        "mean images per batch",
        (0.0, 9.0),
        [
            Series(r["config"], configs[r["config"]], [(r["mean_batch_images"], r["images_per_s"])], joined=False)
            for r in figures["server"]
        ],
    )
    legend = {f"batch {b}": colour for b, colour in BATCH_COLOURS.items()} | configs
    return panels_svg([latency, throughput], legend)


def table(figures: dict) -> str:
    lines = ["### U-Net: a guided call per batch size (median), latency over the teacher's per MAC ratio", ""]
    lines += ["| model | MACs x teacher | " + " | ".join(f"batch {b}" for b in BATCHES) + " |"]
    lines += ["|---|---|" + "---|" * len(BATCHES)]
    by_model: dict[str, dict[int, dict]] = {}
    for row in figures["unet"]:
        by_model.setdefault(row["model"], {})[row["batch"]] = row
    for model, rows in by_model.items():
        cells = [
            f"{r['seconds'] * 1000:.0f} ms, {r['latency_per_mac']:.2f}x, {r['gmacs_per_s']:.1f} GMAC/s"
            for r in (rows[b] for b in BATCHES)
        ]
        lines.append(f"| {model} | {rows[BATCHES[0]]['mac_ratio']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"GEMM (2048^3 fp32): {figures['gemm_gmacs_per_s']:.1f} GMAC/s on {figures['threads']} threads."]
    gated = figures["gated"]
    lines += [
        "",
        f"Mixed batch of {gated['batch']} images, one guided step: teacher gated per row "
        f"{gated['gated_teacher_s']:.3f} s, sliced experts one batch per code {gated['sliced_experts_s']:.3f} s "
        f"({gated['speedup']:.2f}x).",
        "",
        f"### Server at saturation ({figures['clients']} closed-loop clients, {figures['requests']} requests, "
        f"{figures['steps']} steps)",
        "",
        "| config | images/s | x teacher | p50 s | p95 s | mean batch | router share | outside-server share "
        "| engine busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    teacher = next((r for r in figures["server"] if r["config"] == "teacher"), None)
    for r in figures["server"]:
        relative = f"{r['images_per_s'] / teacher['images_per_s']:.2f}" if teacher else "-"
        lines.append(
            f"| {r['config']} | {r['images_per_s']:.2f} | {relative} | {r['latency_p50_s']:.2f} | "
            f"{r['latency_p95_s']:.2f} | {r['mean_batch_images']:.1f} | {r['router_share']:.3f} | "
            f"{r['outside_server_share']:.3f} | {r['engine_busy_share']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / DEFAULT_BUNDLE)
    parser.add_argument("--teacher", type=Path, default=REPO / "bundles/shapes/teacher")
    parser.add_argument("--repeats", type=int, default=5, help="U-Net calls per model and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96, help="requests per server configuration")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="APTP_MAX_BATCH_SIZE of the batched configurations")
    parser.add_argument("--skip-server", action="store_true", help="the offline parts only")
    parser.add_argument("--out", default="benchmarks/results/serving/serving")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle, teacher = RoutedPipeline.load(args.bundle), RoutedPipeline.load(args.teacher)
    print("U-Net latency ...", flush=True)
    figures = {
        "threads": args.threads,
        "clients": args.clients,
        "requests": args.requests,
        "steps": args.steps,
        "unet": unet_latency(bundle, teacher, args.repeats),
        "gemm_gmacs_per_s": gemm_rate(),
        "gated": gated_teacher(bundle, teacher, args.batch, args.repeats),
        "server": [],
    }
    if not args.skip_server:
        from load import shapes_captions

        prompts = shapes_captions(64)
        batch = str(args.batch)
        configs = [
            ("bundle, whole batches", args.bundle, {"APTP_MAX_BATCH_SIZE": batch, "APTP_BATCHING": "request"}),
            ("bundle, step-level", args.bundle, {"APTP_MAX_BATCH_SIZE": batch, "APTP_BATCHING": "step"}),
            ("bundle, batch 1", args.bundle, {"APTP_MAX_BATCH_SIZE": "1", "APTP_BATCHING": "request"}),
            ("teacher", args.teacher, {"APTP_MAX_BATCH_SIZE": batch, "APTP_BATCHING": "request"}),
        ]
        print("server ...", flush=True)
        figures["server"] = [serve_and_measure(name, path, env, args, prompts) for name, path, env in configs]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    provenance = collect_provenance([args.bundle, args.teacher], config=settings)
    out = Path(args.out)
    (out.parent / f"{out.name}.svg").write_text(plot(figures))
    text = table(figures) + f"\n\n![U-Net latency against MACs, and throughput per configuration]({out.name}.svg)\n"
    write_report(out.parent, out.name, figures, text, echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
