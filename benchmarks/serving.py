"""How close serving runs to what the codes' MACs allow: U-Net latency against MACs, the machine's GEMM rate, and
server throughput and latency at saturation, side by side in one run.

    .venv/bin/python benchmarks/serving.py --out benchmarks/results/serving/serving

Parts, each printed and written to OUT.json / OUT.md with provenance:

- **unet**: one guided U-Net call (2 rows per image) of every code and of the teacher at batch 1, 2, 4, 8 and 16,
  the models alternating within each repetition (median of `--repeats`). For each code: its latency over the
  teacher's, divided by its MAC ratio ("latency per MAC x teacher", 1.0 when time follows MACs), and the GMAC/s the
  call reaches.
- **gemm**: a 2048 x 2048 fp32 matmul on the same threads: the machine's dense rate, the U-Net's ceiling.
- **layout**: every model's guided call at batch 1 and 8 with its weights in the default layout (NCHW) and
  channels-last, alternating: what `APTP_CHANNELS_LAST` (on by default) buys. The other parts run the models as
  `aptp serve` loads them (`Settings.load_pipeline`).
- **offline**: the same requests the server configurations send, without a server: encoded and routed at once,
  then each code's in batches through the engine's own batch function (`server.engine.run_jobs`), on `--workers`
  threads as the engine runs them (and on one worker with every thread), what the server's throughput is held
  against; and per-sample dynamic pruning of them, the teacher gated row by row by each prompt's code
  (`pruning.gates.UNetGates`) in mixed batches of arrival order, on the same threads.
- **server**: `aptp serve` at saturation (closed loop: `--clients` clients, each sending its next request when the
  last is answered) on a mixed prompt stream, for the bundle with whole-batch batching (`--workers` engine workers
  on `--threads` / `--workers` threads each; also with one worker on every thread, under PASSIVE OpenMP waits, and
  with 2 routing threads instead of 1) and with step-level batching (the same workers, each stepping one code at a
  time), the bundle with batches of one, and the teacher. Every server runs at once;
  `--rounds` rounds each run the offline part and then every server in turn, and ratios are taken within a round
  (on a shared host the machine's speed drifts by tens of percent over minutes). Throughput (images/s: the steady
  rate, while every client has a request in the server, `steady_rate`; the whole run's beside it), latency
  p50/p95, the routed MACs, where a request's time went (the server's report: routing, queueing, computing; the rest
  of the client's latency is HTTP, JSON and PNG), the engine's busy share of the run (`aptp_compute_seconds` over
  the wall time), and the cores the server process kept busy (its CPU time over the wall time; the offline runs
  report theirs too), split by thread into the engine's, the routing thread's and the rest (event loop, HTTP, PNG).
- **overload**: the bundle offered `--overload` times its saturation rate (open loop, `--overload-seconds`), one
  server refusing with 429 when full (the default) and one degrading to cheaper codes (`APTP_DEGRADE_WHEN_FULL`),
  alternating in rounds as above: what is served and how fast, what is refused and how fast.
- **light load**: whole batches and step-level batching (both on the same workers) offered `--light` times the
  whole-batch server's saturation rate (open loop, `--light-seconds`), alternating in rounds: the latency a request
  sees when the server is not full, where step-level batching lets it start at once instead of waiting for a batch.
- **targets**: the serving issue's bars beside what the run measured.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import itertools
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from server.openmp import use_serving_wait_policy  # noqa: E402

if __name__ == "__main__":  # the offline parts wait for work as `aptp serve` does: set before torch loads OpenMP
    use_serving_wait_policy()

import httpx  # noqa: E402
import torch  # noqa: E402
from load import (  # noqa: E402
    ServerProcess,
    free_port,
    percentile,
    proc_cpu_seconds,
    shapes_captions,
    thread_cpu_seconds,
    wait_ready,
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from svg import Panel, Series, panels_svg  # noqa: E402

from aptp.conditioning.prompts import Conditioning  # noqa: E402
from aptp.formats.kinds import DEFAULT_BUNDLE  # noqa: E402
from aptp.formats.report import collect_provenance, write_report  # noqa: E402
from aptp.pipeline import RoutedPipeline  # noqa: E402
from aptp.sampling import denoise, run_to_end  # noqa: E402
from server.engine import GenerationJob, run_jobs  # noqa: E402
from server.priority import use_intra_op_threads  # noqa: E402
from server.settings import Settings  # noqa: E402

BATCHES = (1, 2, 4, 8, 16)
# The server configurations, by name in the report.
WHOLE_BATCHES, STEP_LEVEL, BATCH_ONE = "bundle, whole batches", "bundle, step-level", "bundle, batch 1"
PASSIVE_WAITS = "bundle, whole batches, OMP_WAIT_POLICY=PASSIVE"
TWO_ROUTING_THREADS = "bundle, whole batches, 2 routing threads"
ONE_WORKER = "bundle, whole batches, one engine worker"
PASSIVE_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
REFUSE, DEGRADE = "refuse when full (default)", "degrade when full"
LIGHT_POLICIES = {"whole batches": "request", "step-level (default)": "step"}
TEACHER = "teacher"
# `--servers`: a short name for each server configuration.
SERVER_CHOICES = {
    WHOLE_BATCHES: "whole",
    ONE_WORKER: "one-worker",
    PASSIVE_WAITS: "passive",
    TWO_ROUTING_THREADS: "routing-2",
    STEP_LEVEL: "step",
    BATCH_ONE: "batch-1",
    TEACHER: "teacher",
}


# ------------------------------------------------------------------------------------------------ U-Net latency
def guided_inputs(pipeline: RoutedPipeline, batch: int) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """What one guided step feeds a U-Net for `batch` images: 2 x batch rows of noise, timesteps and prompts."""
    prompts = pipeline.encode(["a red circle in the top left corner"] * batch)
    context = Conditioning.cat([pipeline.empty_prompt.repeat(batch), prompts]).for_unet()
    unet = pipeline.experts[0]
    size = pipeline.latent_size
    x = torch.randn(2 * batch, unet.config.out_channels, size, size, generator=torch.Generator().manual_seed(0))
    return x, torch.full((2 * batch,), 500), context


@torch.inference_mode()
def call_seconds(unet, x, t, context, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        denoise(unet, x, t, context)
        times.append(time.perf_counter() - began)
    return times


def alternating_medians(models: dict[str, torch.nn.Module], inputs, repeats: int) -> dict[str, float]:
    """Median seconds of one call of each model on `inputs` (`guided_inputs`), the models alternating within every
    repetition (on a shared host the machine's speed drifts over minutes), each called once at this shape first."""
    for unet in models.values():
        call_seconds(unet, *inputs, 1)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, unet in models.items():
            samples[name] += call_seconds(unet, *inputs, 1)
    return {name: statistics.median(times) for name, times in samples.items()}


def served_models(bundle: RoutedPipeline, teacher: RoutedPipeline) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, U-Net, MACs per call) of the teacher and of every code."""
    models = [(TEACHER, teacher.experts[0], teacher.teacher_macs)]
    return models + [(f"code {c.code}", bundle.experts[c.code], c.macs) for c in bundle.codes]


def unet_latency(bundle: RoutedPipeline, teacher: RoutedPipeline, repeats: int) -> list[dict]:
    """Median guided-call seconds per model and batch, models alternating within every repetition."""
    models = served_models(bundle, teacher)
    rows = []
    for batch in BATCHES:
        medians = alternating_medians({name: unet for name, unet, _ in models}, guided_inputs(bundle, batch), repeats)
        teacher_s = medians[TEACHER]
        for name, _, macs in models:
            seconds = medians[name]
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
def layout_speedup(bundle: RoutedPipeline, teacher: RoutedPipeline, repeats: int, batches=(1, 8)) -> list[dict]:
    """Per model and batch size, the median guided call with the weights in the default layout (NCHW) and
    channels-last (NHWC), the two alternating: what `APTP_CHANNELS_LAST` buys."""
    rows = []
    for batch in batches:
        inputs = guided_inputs(bundle, batch)
        for name, unet, _ in served_models(bundle, teacher):
            layouts = {
                layout: copy.deepcopy(unet).to(memory_format=memory_format)
                for layout, memory_format in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last))
            }
            medians = alternating_medians(layouts, inputs, repeats)
            nchw, nhwc = medians["nchw"], medians["channels_last"]
            rows.append(
                {"model": name, "batch": batch, "nchw_s": nchw, "channels_last_s": nhwc, "speedup": nchw / nhwc}
            )
    return rows


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


# ------------------------------------------------------------------------------------------------------ offline
def _cores(pid: int, cpu_began: float | None, wall: float) -> float | None:
    """The cores process `pid` kept busy since it had used `cpu_began` CPU-seconds, `wall` seconds ago."""
    cpu_ended = proc_cpu_seconds(pid)
    return None if cpu_began is None or cpu_ended is None else (cpu_ended - cpu_began) / wall


# A server's threads by OS name (`server.priority.name_native_thread`); the rest: the event loop, HTTP, PNG, ...
THREAD_PARTS = {"engine": "aptp-engine", "routing": "aptp-routing"}


def cores_by_part(before: dict[str, float] | None, after: dict[str, float] | None, wall: float) -> dict | None:
    """The cores each part of a server kept busy between two `thread_cpu_seconds` readings `wall` seconds apart:
    its engine threads (with the OpenMP workers that took their names), its routing thread, and the rest."""
    if before is None or after is None:
        return None
    parts = dict.fromkeys([*THREAD_PARTS, "rest"], 0.0)
    for name, seconds in after.items():
        part = next((part for part, prefix in THREAD_PARTS.items() if name.startswith(prefix)), "rest")
        parts[part] += (seconds - before.get(name, 0.0)) / wall
    return parts


def _throughput(images: int, began: float, cpu_began: float | None) -> dict:
    wall = time.perf_counter() - began
    return {
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "cores": _cores(os.getpid(), cpu_began, wall),
    }


def request_texts(prompts: list[str], requests: int) -> list[str]:
    """The prompt of request i, as the server parts send it."""
    return [prompts[i % len(prompts)] for i in range(requests)]


def side_by_side(tasks: list[Callable[[int], object]], workers: int, threads: int) -> None:
    """Run `tasks` in order on `workers` threads of `threads` intra-op threads each: each thread takes the next task
    when it is done with its last, as the engine's workers take batches (`server.engine`), and calls it with its own
    index (0 to `workers` - 1)."""
    pending, lock, errors = list(reversed(tasks)), threading.Lock(), []

    def work(worker: int) -> None:
        use_intra_op_threads(threads)
        with torch.inference_mode():
            while True:
                with lock:
                    if not pending or errors:
                        return
                    task = pending.pop()
                try:
                    task(worker)
                except BaseException as error:  # noqa: BLE001 - raised again below
                    errors.append(error)

    running = [threading.Thread(target=work, args=(i,), name=f"offline-worker-{i}") for i in range(workers)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    if errors:
        raise errors[0]


@torch.inference_mode()
def offline_engine(bundle: RoutedPipeline, texts: list[str], steps: int, batch: int, workers: int, threads: int):
    """The server's work without the server: request i (prompt `texts[i]`, seed i) encoded and routed with all the
    others at once, then each code's requests in batches of `batch` through `server.engine.run_jobs`, the function
    the engine runs a batch with, on `workers` threads of `threads` intra-op threads as the engine lays them out.
    What the server's throughput is measured against."""
    guidance = bundle.default_guidance_scale
    began, cpu_began = time.perf_counter(), proc_cpu_seconds(os.getpid())
    encoded = bundle.encode(texts)
    codes = bundle.route(encoded).codes
    batches = []
    for code in sorted(set(codes)):
        rows = [i for i, c in enumerate(codes) if c == code]
        for start in range(0, len(rows), batch):
            jobs = [GenerationJob(encoded.select([i]), [i], steps, guidance) for i in rows[start : start + batch]]
            batches.append(lambda _, code=code, jobs=jobs: run_jobs(bundle, code, jobs))
    side_by_side(batches, workers, threads)
    return _throughput(len(texts), began, cpu_began)


@torch.inference_mode()
def offline_gated_teacher(
    bundle: RoutedPipeline,
    teacher: RoutedPipeline,
    texts: list[str],
    steps: int,
    batch: int,
    workers: int,
    threads: int,
):
    """Per-sample dynamic pruning of the same requests: each routed as the bundle routes it, then, in arrival order,
    `batch` at a time, through the teacher with every row gated by its code's architecture
    (`pruning.gates.UNetGates`; with hard gates a row computes what its sliced code computes), laid out on threads as
    `offline_engine`. A mixed batch runs at the teacher's cost: what serving the codes as separate dense networks
    saves."""
    from pruning.gates import UNetGates

    architectures = bundle.router.code_architectures()
    guidance = bundle.default_guidance_scale
    # One gated copy of the teacher per worker: the gates are the module's state, set per batch.
    copies = [teacher.experts[0]] + [copy.deepcopy(teacher.experts[0]) for _ in range(workers - 1)]
    gates = [UNetGates(unet, bundle.router.space).attach() for unet in copies]

    def gated_batch(rows: list[int], worker: int) -> None:
        gates[worker].set(architectures[[codes[i] for i in rows]])  # both guidance halves take their row's gates
        trajectory = teacher.trajectory(0, encoded.select(rows), rows, steps, [guidance] * len(rows))
        teacher.decode(run_to_end(copies[worker], trajectory))

    try:
        began, cpu_began = time.perf_counter(), proc_cpu_seconds(os.getpid())
        # One encoding conditions and routes: a bundle's codes read the teacher's own text adapter (checked at load).
        encoded = bundle.encode(texts)
        codes = bundle.route(encoded).codes
        starts = range(0, len(texts), batch)
        tasks = [functools.partial(gated_batch, list(range(s, min(s + batch, len(texts))))) for s in starts]
        side_by_side(tasks, workers, threads)
        result = _throughput(len(texts), began, cpu_began)
    finally:
        for gate in gates:
            gate.detach()
    return result


# ------------------------------------------------------------------------------------------------------ server
def _compute_seconds(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "aptp_compute_seconds_sum"
    )


def _mean_macs_ratio(reports: list[dict]) -> float:
    """The served images' mean U-Net MACs per call over the teacher's."""
    ratios = [r["macs_per_call"] / r["teacher_macs_per_call"] for r in reports for _ in r["seeds"]]
    return statistics.mean(ratios)


def steady_rate(answers: list[tuple[float, int]], last_sent: float, clients: int) -> float | None:
    """Images per second while every one of `clients` closed-loop clients had a request in the server: the images
    answered after the answer that ends the first wave (the `clients`-th) up to the sending of the last request
    (from then on clients fall idle one by one), over that time. `answers`: (time, images) of every answer. None when
    the run has no such window (`requests` <= 2 x `clients`).

    A run's whole-run rate also counts its first wave, routed as one burst, and its drain, when ever fewer requests
    are left to batch; the offline engine it is held against has all its requests from the start to the end."""
    ordered = sorted(answers)
    if len(ordered) <= clients or last_sent <= ordered[clients - 1][0]:
        return None
    start = ordered[clients - 1][0]
    inside = [images for at, images in ordered[clients:] if at <= last_sent]
    return sum(inside) / (last_sent - start) if inside else None


async def closed_loop(url: str, prompts: list[str], clients: int, requests: int, steps: int) -> dict:
    """`clients` clients sending `requests` in all, each its next as soon as its last is answered. `images_per_s` is
    the steady rate (`steady_rate`), `run_images_per_s` the whole run's."""
    todo = list(range(requests))
    latencies, reports, answers, sent = [], [], [], []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop()
            body = {"prompt": prompts[i % len(prompts)], "seed": i, "steps": steps}
            began = time.perf_counter()
            sent.append(began)
            response = await client.post(f"{url}/generate", json=body)
            response.raise_for_status()
            answered = time.perf_counter()
            latencies.append(answered - began)
            reports.append(response.json()["report"])
            answers.append((answered, len(reports[-1]["seeds"])))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        before = _compute_seconds((await client.get(f"{url}/metrics")).text)
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - began
        busy = _compute_seconds((await client.get(f"{url}/metrics")).text) - before
    images = sum(len(r["seeds"]) for r in reports)
    keys = ("router_seconds", "encode_seconds", "queue_seconds", "total_seconds")
    mean = {k: statistics.mean(r[k] for r in reports) for k in keys}
    client_mean = statistics.mean(latencies)
    return {
        "requests": len(reports),
        "wall_s": wall,
        "images_per_s": steady_rate(answers, max(sent), clients),
        "run_images_per_s": images / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "mean_batch_images": statistics.mean(r["batch_images"] for r in reports),
        "mean_macs_ratio": _mean_macs_ratio(reports),
        "mean_router_s": mean["router_seconds"],
        "mean_queue_s": mean["queue_seconds"],
        "mean_server_s": mean["total_seconds"],
        "mean_client_s": client_mean,
        "outside_server_share": (client_mean - mean["total_seconds"]) / client_mean,
        "router_share": mean["router_seconds"] / client_mean,
        # Encoding is what the U-Net's conditioning needs routed or not (the teacher's server encodes too); the rest
        # of the routing stage's time is what choosing a code adds.
        "encode_share": mean["encode_seconds"] / client_mean,
        "engine_busy_share": busy / wall,
    }


async def open_loop(url: str, prompts: list[str], rate: float, seconds: float, steps: int) -> dict:
    """Requests at `rate` per second for `seconds`, on a fixed schedule whatever the answers (an overload is an
    arrival rate the server cannot keep up with), then every answer awaited. What was served, and how fast; what
    was refused, and how fast."""
    count = round(rate * seconds)
    answers: list[tuple[int, float, dict | None]] = []

    async def one(client: httpx.AsyncClient, i: int, start: float) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        body = {"prompt": prompts[i % len(prompts)], "seed": i, "steps": steps}
        sent = time.perf_counter()
        response = await client.post(f"{url}/generate", json=body)
        report = response.json()["report"] if response.status_code == 200 else None
        answers.append((response.status_code, time.perf_counter() - sent, report))

    # No connection limit: a pool that queued requests on the client would lower the rate the server sees.
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i, start) for i in range(count)))
        wall = time.perf_counter() - start
    served = [(seconds, report) for status, seconds, report in answers if status == 200]
    refused = [seconds for status, seconds, _ in answers if status == 429]
    reports = [report for _, report in served]
    return {
        "offered": count,
        "offered_per_s": rate,
        "seconds": seconds,
        "served": len(served),
        "refused": len(refused),
        "failed": count - len(served) - len(refused),
        "wall_s": wall,
        "served_images_per_s": sum(len(r["seeds"]) for r in reports) / wall,
        "latency_p50_s": percentile([s for s, _ in served], 50),
        "latency_p95_s": percentile([s for s, _ in served], 95),
        "refusal_p95_s": percentile(refused, 95),
        "degraded_share": statistics.mean(r["degraded"] for r in reports) if reports else None,
        "mean_macs_ratio": _mean_macs_ratio(reports) if reports else None,
        "mean_batch_images": statistics.mean(r["batch_images"] for r in reports) if reports else None,
    }


def _server_env(args, settings: dict[str, str]) -> dict[str, str]:
    layout = {"APTP_ENGINE_WORKERS": str(args.workers), "APTP_THREADS": str(args.worker_threads)}
    return {**layout, "APTP_MAX_WAIT_MS": "50", "APTP_MAX_QUEUE_SIZE": "64", **settings}


def alternating(configs: list[tuple[str, Path, dict[str, str]]], args, measure, offline_run=None):
    """Every configuration's server started at once, warmed with one closed-loop wave, then `--rounds` rounds, each
    running `offline_run()` (when given) and then `measure(url)` (a coroutine function) on every server in turn.
    Ratios between configurations are taken within a round, minutes apart at most, so a machine whose speed drifts
    (a shared host) moves them all alike; idle servers wait without spinning. Returns each configuration's rounds and
    the offline runs."""
    servers: dict[str, tuple[ServerProcess, str, Path]] = {}
    try:
        for name, bundle, settings in configs:
            port = free_port()
            log = Path(args.out).with_name(f"{Path(args.out).name}-{len(servers)}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            server = ServerProcess(bundle, port, _server_env(args, settings), log, "cpu", ())
            servers[name] = (server, f"http://127.0.0.1:{port}", log)

        async def run() -> tuple[dict, list]:
            async with httpx.AsyncClient() as control:
                for server, url, _ in servers.values():
                    await wait_ready(control, url, server)
            for _, url, _ in servers.values():
                await closed_loop(url, args.prompts, args.clients, args.clients, args.steps)
            rounds: dict[str, list[dict]] = {name: [] for name in servers}
            offline = []
            for number in range(args.rounds):
                if offline_run is not None:
                    offline.append(offline_run())
                for name, (server, url, _) in servers.items():
                    cpu_began, threads_began = proc_cpu_seconds(server.pid), thread_cpu_seconds(server.pid)
                    result = await measure(url)
                    result["server_cores"] = _cores(server.pid, cpu_began, result["wall_s"])
                    parts = cores_by_part(threads_began, thread_cpu_seconds(server.pid), result["wall_s"])
                    result["server_cores_by_part"] = parts
                    rounds[name].append(result)
                    print(f"  round {number + 1}, {name}: {summary(rounds[name][-1])}", flush=True)
            return rounds, offline

        return asyncio.run(run())
    finally:
        for server, _, log in servers.values():
            server.stop(60)
            log.unlink(missing_ok=True)


def summary(result: dict) -> str:
    if "served" in result:
        return f"{result['served']} served, {result['refused']} refused, {result['served_images_per_s']:.2f} images/s"
    return f"{result['images_per_s']:.2f} images/s"


def median_round(name: str, settings: dict[str, str], rounds: list[dict], key: str = "images_per_s") -> dict:
    """A configuration's report: its round of median `key`, with every round's."""
    middle = sorted(rounds, key=lambda r: r[key])[len(rounds) // 2]
    return {"config": name, "settings": settings, **middle, f"rounds_{key}": [r[key] for r in rounds]}


# --------------------------------------------------------------------------------------------------------- main
BATCH_COLOURS = {1: "#1f77b4", 4: "#ff7f0e", 8: "#2ca02c", 16: "#d62728"}
CONFIG_COLOURS = ("#d62728", "#ff7f0e", "#9467bd", "#bcbd22", "#8c564b", "#000000", "#17becf")


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
    # as many configurations as there are: colours repeat rather than run out
    configs = {r["config"]: colour for r, colour in zip(figures["server"], itertools.cycle(CONFIG_COLOURS))}
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


def targets(figures: dict) -> list[dict]:
    """The serving issue's bars, each beside what this run measured (None: a part that did not run)."""
    unet, server = figures["unet"], {r["config"]: r for r in figures["server"]}
    rows = []

    def bar(name: str, value: float | None, relation: str, limit: float) -> None:
        met = None if value is None else (value <= limit if relation == "<=" else value >= limit)
        rows.append({"target": name, "value": value, "relation": relation, "limit": limit, "met": met})

    for batch in (1, 8):
        worst = max(r["latency_per_mac"] for r in unet if r["batch"] == batch and r["model"] != TEACHER)
        bar(f"latency per MAC x teacher, worst code, batch {batch}", worst, "<=", 1.1)
    teacher_8 = next(r for r in unet if r["model"] == TEACHER and r["batch"] == 8)
    bar("teacher U-Net GMAC/s at batch 8 / GEMM's", teacher_8["gmacs_per_s"] / figures["gemm_gmacs_per_s"], ">=", 0.6)
    bundle = server.get(WHOLE_BATCHES)
    ratios = round_ratios(figures)
    bar("bundle images/s / ideal (teacher's / routed MAC ratio)", ratios.get("ideal"), ">=", 0.9)
    bar("bundle images/s / the same engine's offline", ratios.get("offline"), ">=", 0.95)
    bar("bundle images/s / per-sample gated teacher's offline", ratios.get("gated"), ">=", 2.0)
    bar("routing share of end-to-end time", bundle["router_share"] if bundle else None, "<=", 0.02)
    beyond = bundle["router_share"] - bundle["encode_share"] if bundle else None
    bar("the same beyond prompt encoding (choosing the code)", beyond, "<=", 0.02)
    outside = bundle["outside_server_share"] if bundle else None
    bar("share of end-to-end time outside the server (HTTP, JSON, PNG)", outside, "<=", 0.02)
    return rows


def round_ratios(figures: dict) -> dict[str, float]:
    """The whole-batch bundle server's throughput over each reference, taken within each round, median over rounds:
    `ideal` (the teacher server's / the routed MAC ratio), `offline` (the same engine offline) and `gated` (the
    per-sample gated teacher offline). Empty without server rounds."""
    per_round: dict[str, list[float]] = {"ideal": [], "offline": [], "gated": []}
    for servers, offline in zip(figures["rounds"], figures["offline_rounds"], strict=False):
        bundle, teacher = servers.get(WHOLE_BATCHES), servers.get(TEACHER)
        if bundle is None:
            continue
        served = bundle["images_per_s"]
        if teacher is not None:
            per_round["ideal"].append(served / (teacher["images_per_s"] / bundle["mean_macs_ratio"]))
        per_round["offline"].append(served / offline["engine"]["images_per_s"])
        per_round["gated"].append(served / offline["gated_teacher"]["images_per_s"])
    return {name: statistics.median(values) for name, values in per_round.items() if values}


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _parts_cell(parts: dict | None) -> str:
    return "" if parts is None else " (" + " / ".join(f"{parts[part]:.2f}" for part in (*THREAD_PARTS, "rest")) + ")"


def _offline_cell(run: dict) -> str:
    return f"{run['images_per_s']:.2f} ({_cell(run['cores'])} cores)"


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
    lines += ["", "### Weight layout: a guided call, NCHW against channels-last (`APTP_CHANNELS_LAST`)", ""]
    lines += ["| model | batch | NCHW | channels-last | speed-up |", "|---|---|---|---|---|"]
    for r in figures["layout"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['nchw_s'] * 1000:.0f} ms | {r['channels_last_s'] * 1000:.0f} ms "
            f"| {r['speedup']:.2f}x |"
        )
    offline = figures["offline_rounds"]
    lines += [
        "",
        f"### Offline: the same {offline[0]['engine']['images']} requests without a server ({figures['steps']} steps, "
        f"batches of {figures['batch']}), images/s per round",
        "",
        "| run | " + " | ".join(f"round {i + 1}" for i in range(len(offline))) + " |",
        "|---|" + "---|" * len(offline),
        f"| the engine's batches, one code each (`server.engine.run_jobs`), {figures['workers']} worker(s) | "
        + " | ".join(_offline_cell(r["engine"]) for r in offline)
        + " |",
        f"| the same, one worker on {figures['threads']} threads | "
        + " | ".join(_offline_cell(r["engine_one_worker"]) for r in offline)
        + " |",
        "| the teacher gated per row, mixed batches in arrival order | "
        + " | ".join(_offline_cell(r["gated_teacher"]) for r in offline)
        + " |",
    ]
    if figures["server"]:
        lines += [
            "",
            f"### Server at saturation ({figures['clients']} closed-loop clients, {figures['requests']} requests, "
            f"{figures['steps']} steps): each configuration's median round; rounds alternate the servers and the "
            "offline runs. Images/s while every client has a request in the server (from the answer that ends the "
            "first wave to the sending of the last request); whole run: the same with the first wave and the drain",
            "",
            "| config | images/s | every round | whole run | x teacher | p50 s | p95 s | mean batch | routed MACs "
            "| router share | of it encoding | outside-server share | engine busy | cores used (engine / routing / "
            "rest) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        teacher = next((r for r in figures["server"] if r["config"] == TEACHER), None)
        for r in figures["server"]:
            relative = f"{r['images_per_s'] / teacher['images_per_s']:.2f}" if teacher else "-"
            lines.append(
                f"| {r['config']} | {r['images_per_s']:.2f} | "
                + ", ".join(f"{v:.2f}" for v in r.get("rounds_images_per_s", [r["images_per_s"]]))
                + f" | {r['run_images_per_s']:.2f} | {relative} | {r['latency_p50_s']:.2f} | "
                f"{r['latency_p95_s']:.2f} | {r['mean_batch_images']:.1f} | {r['mean_macs_ratio']:.3f} | "
                f"{r['router_share']:.3f} | {r['encode_share']:.3f} | {r['outside_server_share']:.3f} | "
                f"{r['engine_busy_share']:.2f} | "
                f"{_cell(r.get('server_cores'))}{_parts_cell(r.get('server_cores_by_part'))} |"
            )
    if figures["overload"]:
        first = figures["overload"][0]
        lines += [
            "",
            f"### Overload: {first['offered_per_s']:.1f} requests/s for {first['seconds']:.0f} s (open loop, "
            f"{first['offered']} requests), {figures['batch']}-image batches",
            "",
            "| policy | served | refused (429) | failed | served images/s | every round | p50 s | p95 s | 429 p95 s "
            "| degraded | routed MACs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in figures["overload"]:
            lines.append(
                f"| {r['config']} | {r['served']} | {r['refused']} | {r['failed']} | {r['served_images_per_s']:.2f} | "
                + ", ".join(f"{v:.2f}" for v in r.get("rounds_served_images_per_s", [r["served_images_per_s"]]))
                + f" | {_cell(r['latency_p50_s'])} | {_cell(r['latency_p95_s'])} | {_cell(r['refusal_p95_s'], 3)} "
                f"| {_cell(r['degraded_share'])} | {_cell(r['mean_macs_ratio'], 3)} |"
            )
    if figures.get("light"):
        first = figures["light"][0]
        lines += [
            "",
            f"### Light load: {first['offered_per_s']:.1f} requests/s for {first['seconds']:.0f} s (open loop, "
            f"{first['offered']} requests), {figures['batch']}-image batches; each policy's round of median p50",
            "",
            "| batching | served | served images/s | p50 s | every round's p50 s | p95 s | images per U-Net call |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in figures["light"]:
            lines.append(
                f"| {r['config']} | {r['served']} | {r['served_images_per_s']:.2f} | {_cell(r['latency_p50_s'])} | "
                + ", ".join(f"{v:.2f}" for v in r["rounds_latency_p50_s"])
                + f" | {_cell(r['latency_p95_s'])} | {_cell(r['mean_batch_images'], 1)} |"
            )
    lines += ["", "### Targets", "", "| target | measured | bar | met |", "|---|---|---|---|"]
    for row in figures["targets"]:
        met = {True: "yes", False: "no", None: "-"}[row["met"]]
        lines.append(f"| {row['target']} | {_cell(row['value'], 3)} | {row['relation']} {row['limit']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / DEFAULT_BUNDLE)
    parser.add_argument("--teacher", type=Path, default=REPO / "bundles/shapes/teacher")
    parser.add_argument("--repeats", type=int, default=5, help="U-Net calls per model and batch size")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the compute, in all")
    parser.add_argument(
        "--workers", type=int, default=2, help="engine workers (APTP_ENGINE_WORKERS), each on threads / workers"
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--requests",
        type=int,
        default=160,
        help="requests per server configuration, and offline; more than 2 x --clients, so that the steady rate has a "
        "window (with 160 and 32 clients: 96 answers)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="APTP_MAX_BATCH_SIZE of the batched configurations")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the servers and offline runs")
    parser.add_argument("--overload", type=float, default=2.0, help="offered rate over the bundle's saturation rate")
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--overload-queue", type=int, default=8, help="APTP_MAX_QUEUE_SIZE under overload")
    parser.add_argument("--skip-server", action="store_true", help="the offline parts only")
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=list(SERVER_CHOICES.values()),
        help="only these server configurations (default: every one); the targets and the overload need `whole`",
    )
    parser.add_argument("--skip-overload", action="store_true", help="no overload part")
    parser.add_argument("--light", type=float, default=0.5, help="light load's rate over the saturation rate (0: none)")
    parser.add_argument("--light-seconds", type=float, default=30.0)
    parser.add_argument("--out", default="benchmarks/results/serving/serving")
    args = parser.parse_args(argv)
    args.prompts = shapes_captions(64)
    if args.requests <= 2 * args.clients:
        parser.error(f"--requests ({args.requests}) must be more than twice --clients ({args.clients})")
    if args.workers < 1 or args.threads % args.workers:
        parser.error(f"--threads ({args.threads}) must split evenly over --workers ({args.workers})")
    args.worker_threads = args.threads // args.workers
    torch.set_num_threads(args.threads)
    # Loaded as `aptp serve` loads them (the serving layout included), so the parts measure the served models.
    bundle, teacher = (Settings(bundle=path, _env_file=None).load_pipeline() for path in (args.bundle, args.teacher))
    print("U-Net latency ...", flush=True)
    figures = {
        "threads": args.threads,
        "workers": args.workers,
        "clients": args.clients,
        "requests": args.requests,
        "steps": args.steps,
        "batch": args.batch,
        "unet": unet_latency(bundle, teacher, args.repeats),
        "gemm_gmacs_per_s": gemm_rate(),
        "layout": layout_speedup(bundle, teacher, args.repeats),
    }
    texts = request_texts(args.prompts, args.requests)

    def offline_run() -> dict:
        layout = (args.workers, args.worker_threads)
        return {
            "engine": offline_engine(bundle, texts, args.steps, args.batch, *layout),
            "engine_one_worker": offline_engine(bundle, texts, args.steps, args.batch, 1, args.threads),
            "gated_teacher": offline_gated_teacher(bundle, teacher, texts, args.steps, args.batch, *layout),
        }

    figures["server"], figures["overload"], figures["light"], figures["rounds"] = [], [], [], []
    if args.skip_server:
        figures["offline_rounds"] = [offline_run()]
    else:
        batch = {"APTP_MAX_BATCH_SIZE": str(args.batch)}
        one_worker = {"APTP_ENGINE_WORKERS": "1", "APTP_THREADS": str(args.threads)}
        configs = [
            (WHOLE_BATCHES, args.bundle, {**batch, "APTP_BATCHING": "request"}),
            (ONE_WORKER, args.bundle, {**batch, "APTP_BATCHING": "request", **one_worker}),
            # GOMP_SPINCOUNT would override PASSIVE's spin count of 0, and this process's environment has one.
            (PASSIVE_WAITS, args.bundle, {**batch, "APTP_BATCHING": "request", **PASSIVE_POLICY}),
            (TWO_ROUTING_THREADS, args.bundle, {**batch, "APTP_BATCHING": "request", "APTP_ROUTING_THREADS": "2"}),
            (STEP_LEVEL, args.bundle, {**batch, "APTP_BATCHING": "step"}),
            (BATCH_ONE, args.bundle, {"APTP_MAX_BATCH_SIZE": "1", "APTP_BATCHING": "request"}),
            (TEACHER, args.teacher, {**batch, "APTP_BATCHING": "request"}),
        ]
        if args.servers:
            configs = [config for config in configs if SERVER_CHOICES[config[0]] in args.servers]
        print(f"server and offline, {args.rounds} alternating rounds ...", flush=True)

        async def saturate(url: str) -> dict:
            return await closed_loop(url, args.prompts, args.clients, args.requests, args.steps)

        rounds, figures["offline_rounds"] = alternating(configs, args, saturate, offline_run)
        figures["server"] = [median_round(name, settings, rounds[name]) for name, _, settings in configs]
        figures["rounds"] = [{name: rounds[name][i] for name, _, _ in configs} for i in range(args.rounds)]
        del bundle, teacher  # the overload's servers are processes of their own
    whole = next((r for r in figures["server"] if r["config"] == WHOLE_BATCHES), None)
    if whole is not None and not args.skip_overload:
        rate = args.overload * whole["images_per_s"]
        print(f"overload at {rate:.1f} requests/s ...", flush=True)
        places = {"APTP_MAX_BATCH_SIZE": str(args.batch), "APTP_MAX_QUEUE_SIZE": str(args.overload_queue)}
        policies = [
            (REFUSE, args.bundle, {**places, "APTP_DEGRADE_WHEN_FULL": "false"}),
            (DEGRADE, args.bundle, {**places, "APTP_DEGRADE_WHEN_FULL": "true"}),
        ]

        async def overload(url: str) -> dict:
            return await open_loop(url, args.prompts, rate, args.overload_seconds, args.steps)

        rounds, _ = alternating(policies, args, overload)
        figures["overload"] = [
            median_round(name, settings, rounds[name], "served_images_per_s") for name, _, settings in policies
        ]
    if whole is not None and args.light > 0:
        rate = args.light * whole["images_per_s"]
        print(f"light load at {rate:.1f} requests/s ...", flush=True)
        policies = [
            (name, args.bundle, {"APTP_MAX_BATCH_SIZE": str(args.batch), "APTP_BATCHING": batching})
            for name, batching in LIGHT_POLICIES.items()
        ]

        async def light(url: str) -> dict:
            return await open_loop(url, args.prompts, rate, args.light_seconds, args.steps)

        rounds, _ = alternating(policies, args, light)
        figures["light"] = [
            median_round(name, settings, rounds[name], "latency_p50_s") for name, _, settings in policies
        ]
    figures["targets"] = targets(figures)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "prompts"}
    provenance = collect_provenance([args.bundle, args.teacher], config=settings)
    out = Path(args.out)
    (out.parent / f"{out.name}.svg").write_text(plot(figures))
    text = table(figures) + f"\n\n![U-Net latency against MACs, and throughput per configuration]({out.name}.svg)\n"
    write_report(out.parent, out.name, figures, text, echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
