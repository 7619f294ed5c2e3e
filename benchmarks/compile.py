"""What compiling the experts buys (`APTP_COMPILE_MODE`): every model's guided U-Net call, eager and compiled, side
by side in one run.

    .venv/bin/python benchmarks/compile.py --out benchmarks/results/serving/compile

The bundle and the teacher are loaded twice as `aptp serve` loads them (`Settings.load_pipeline`: channels-last
weights), once eager and once with `--mode`. For each model: the seconds its first compiled call took (compiling
included; the server pays them during warm-up), then at each of `--batches` the median guided call eager and
compiled, all models of both kinds alternating within each repetition (`serving.alternating_medians`), the
speed-up, and each code's latency over the teacher's divided by its MAC ratio in both kinds: the serving issue's
"latency per MAC x teacher" bar (at most 1.1 at batch 1 and 8), which compiling is meant to bring within reach by
removing per-operator fixed costs that do not shrink with a code's width.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import get_args

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from serving import TEACHER, alternating_medians, call_seconds, guided_inputs, served_models  # noqa: E402

from aptp.formats.kinds import DEFAULT_BUNDLE  # noqa: E402
from aptp.formats.report import collect_provenance, write_report  # noqa: E402
from aptp.pipeline import RoutedPipeline  # noqa: E402
from server.settings import CompileMode, Settings  # noqa: E402

KINDS = ("eager", "compiled")
P1 = 1.1  # the serving issue's bar on a code's latency per MAC x the teacher's


def compile_seconds(bundle: RoutedPipeline, teacher: RoutedPipeline) -> dict[str, float]:
    """Per model, the seconds of its first guided call at batch 1 on compiled experts: the compile itself."""
    inputs = guided_inputs(bundle, 1)
    seconds = {}
    for name, unet, _ in served_models(bundle, teacher):
        began = time.perf_counter()
        call_seconds(unet, *inputs, 1)
        seconds[name] = time.perf_counter() - began
    return seconds


def eager_against_compiled(
    eager: tuple[RoutedPipeline, RoutedPipeline],
    compiled: tuple[RoutedPipeline, RoutedPipeline],
    repeats: int,
    batches: tuple[int, ...],
) -> list[dict]:
    """Per batch and model: the median guided call eager and compiled, the speed-up, and the latency per MAC x the
    teacher's of the same kind."""
    models = {kind: served_models(*pair) for kind, pair in zip(KINDS, (eager, compiled), strict=True)}
    rows = []
    for batch in batches:
        together = {(kind, name): unet for kind in KINDS for name, unet, _ in models[kind]}
        medians = alternating_medians(together, guided_inputs(eager[0], batch), repeats)
        for name, _, macs in models["eager"]:
            mac_ratio = macs / eager[1].teacher_macs
            row = {"model": name, "batch": batch, "mac_ratio": mac_ratio}
            for kind in KINDS:
                row[f"{kind}_s"] = medians[kind, name]
                row[f"{kind}_latency_per_mac"] = medians[kind, name] / medians[kind, TEACHER] / mac_ratio
            row["speedup"] = row["eager_s"] / row["compiled_s"]
            rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The P1 bar (the worst code's latency per MAC x teacher at most `P1`) at each batch, eager and compiled."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        codes = [r for r in rows if r["batch"] == batch and r["model"] != TEACHER]
        for kind in KINDS:
            worst = max(r[f"{kind}_latency_per_mac"] for r in codes)
            out.append({"batch": batch, "kind": kind, "worst_latency_per_mac": worst, "limit": P1, "met": worst <= P1})
    return out


def table(figures: dict) -> str:
    lines = [f"### Eager against `torch.compile` (mode {figures['mode']!r}), a guided call (median)", ""]
    lines += [
        "| model | MACs x teacher | batch | eager | compiled | speed-up | per MAC x teacher, eager / compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in figures["rows"]:
        lines.append(
            f"| {r['model']} | {r['mac_ratio']:.3f} | {r['batch']} | {r['eager_s'] * 1000:.0f} ms "
            f"| {r['compiled_s'] * 1000:.0f} ms | {r['speedup']:.2f}x "
            f"| {r['eager_latency_per_mac']:.2f}x / {r['compiled_latency_per_mac']:.2f}x |"
        )
    compiling = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in figures["compile_seconds"].items())
    lines += ["", f"First compiled call (compiling included, batch 1): {compiling}.", ""]
    lines += ["| batch | kind | worst code's latency per MAC x teacher | target | met |", "|---|---|---|---|---|"]
    for t in figures["targets"]:
        worst = f"{t['worst_latency_per_mac']:.2f}x"
        lines.append(f"| {t['batch']} | {t['kind']} | {worst} | <= {t['limit']} | {t['met']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / DEFAULT_BUNDLE)
    parser.add_argument("--teacher", type=Path, default=REPO / "bundles/shapes/teacher")
    modes = [mode for mode in get_args(CompileMode) if mode != "off"]
    parser.add_argument("--mode", default="default", choices=modes)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7, help="calls per model, kind and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/serving/compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def load(path: Path, mode: str) -> RoutedPipeline:
        return Settings(bundle=path, compile_mode=mode, _env_file=None).load_pipeline()

    eager = (load(args.bundle, "off"), load(args.teacher, "off"))
    compiled = (load(args.bundle, args.mode), load(args.teacher, args.mode))
    print("compiling ...", flush=True)
    figures: dict = {"mode": args.mode, "threads": args.threads, "compile_seconds": compile_seconds(*compiled)}
    print("eager against compiled ...", flush=True)
    figures["rows"] = eager_against_compiled(eager, compiled, args.repeats, tuple(args.batches))
    figures["targets"] = targets(figures["rows"])
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    provenance = collect_provenance([args.bundle, args.teacher], config=settings)
    out = Path(args.out)
    write_report(out.parent, out.name, figures, table(figures), echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
