"""The Ray Serve application against the single-process server, at saturation, on this machine.

    .venv/bin/python benchmarks/cluster.py                  # the shipped bundle, 1 expert replica, 2 pairs of runs

Both serve the same bundle with the same batching (`--batch` images per batch, `max_wait_ms` 50) to the same
closed loop of `--clients` clients (`benchmarks/serving.py`'s `closed_loop`), one after the other and alternating
(single, Ray, single, Ray, ...), so drift of the machine shows as a spread instead of a bias. The Ray application
runs with one expert replica: the ratio of throughputs is the overhead of the Ray path itself (the proxy, the
ingress handing each request to the expert replica, Serve's batcher), not a gain from more devices. On one machine
its processes share the same cores as the one process does.

Writes `<out>.json` and `<out>.md` (`benchmarks/results/cluster/cluster` by default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import shapes_captions  # noqa: E402
from serving import serve_and_measure  # noqa: E402

from aptp.formats.kinds import DEFAULT_BUNDLE  # noqa: E402
from aptp.formats.report import collect_provenance, write_report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def table(figures: dict) -> str:
    lines = [
        "# Ray Serve application vs the single-process server",
        "",
        f"Bundle `{figures['bundle']}`, {figures['clients']} closed-loop clients, {figures['requests']} requests per "
        f"run, {figures['steps']} steps, batches of up to {figures['batch']} images, {figures['threads']} torch "
        f"threads per engine, {figures['expert_replicas']} expert replica(s); runs alternate.",
        "",
        "| run | server | images/s | p50 latency (s) | p95 latency (s) | mean batch (images) |",
        "|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(figures["runs"], start=1):
        lines.append(
            f"| {index} | {run['config']} | {run['images_per_s']:.2f} | {run['latency_p50_s']:.2f} | "
            f"{run['latency_p95_s']:.2f} | {run['mean_batch_images']:.2f} |"
        )
    summary = figures["summary"]
    lines += [
        "",
        f"Throughput, Ray / single process: **{summary['throughput_ratio']:.2f}** (median "
        f"{summary['ray_images_per_s']:.2f} against {summary['single_images_per_s']:.2f} images/s); p50 latency ratio "
        f"{summary['p50_ratio']:.2f}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / DEFAULT_BUNDLE)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each engine (APTP_THREADS)")
    parser.add_argument("--pairs", type=int, default=2, help="single/Ray pairs of runs")
    parser.add_argument("--expert-replicas", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/cluster/cluster")
    args = parser.parse_args(argv)
    prompts = shapes_captions(64)
    settings = {"APTP_MAX_BATCH_SIZE": str(args.batch), "APTP_BATCHING": "request"}
    ray_settings = {**settings, "APTP_RAY_EXPERT_REPLICAS": str(args.expert_replicas)}
    runs = []
    for _ in range(args.pairs):
        runs.append(serve_and_measure("single process", args.bundle, settings, args, prompts))
        runs.append(serve_and_measure("Ray Serve", args.bundle, ray_settings, args, prompts, ("--ray",)))
    single = [run for run in runs if run["config"] == "single process"]
    ray = [run for run in runs if run["config"] == "Ray Serve"]

    def median(values: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in values)

    summary = {
        "single_images_per_s": median(single, "images_per_s"),
        "ray_images_per_s": median(ray, "images_per_s"),
        "single_p50_s": median(single, "latency_p50_s"),
        "ray_p50_s": median(ray, "latency_p50_s"),
    }
    summary["throughput_ratio"] = summary["ray_images_per_s"] / summary["single_images_per_s"]
    summary["p50_ratio"] = summary["ray_p50_s"] / summary["single_p50_s"]
    figures = {
        "bundle": str(args.bundle.relative_to(REPO) if args.bundle.is_relative_to(REPO) else args.bundle),
        "clients": args.clients,
        "requests": args.requests,
        "steps": args.steps,
        "batch": args.batch,
        "threads": args.threads,
        "expert_replicas": args.expert_replicas,
        "runs": runs,
        "summary": summary,
    }
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    provenance = collect_provenance([args.bundle], config=config)
    out = Path(args.out)
    write_report(out.parent, out.name, figures, table(figures), echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
