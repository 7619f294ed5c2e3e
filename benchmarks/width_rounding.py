"""Do widths rounded up to a multiple of 8 channels pay? Each code of a bundle, sliced from its teacher as it is and
with every width unit's kept channels rounded up to a multiple of `--multiple`, against the teacher, at the batches
that serve (one guided call), all alternating in one run.

    .venv/bin/python benchmarks/width_rounding.py [--bundle benchmarks/models/aptp-rich-0.4]
        [--teacher benchmarks/models/teacher-rich] [--multiple 8] [--repeats 15]
        [--out benchmarks/results/width-rounding] [--name aptp-rich-0.4]

Rounding pays when the rounded code's call is no slower than the code as it is: the extra channels then come free
(more capacity at the same latency), and a search could keep only such widths. Both versions of a code are sliced
from the teacher's weights here (latency does not depend on the values), in the layout the server uses.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from serving import TEACHER, alternating_medians, guided_inputs  # noqa: E402

from aptp.formats.bundle import read_manifest  # noqa: E402
from aptp.formats.expert import read_expert_info  # noqa: E402
from aptp.formats.report import collect_provenance, write_report  # noqa: E402
from pruning import ArchitectureSpace, slice_unet  # noqa: E402
from pruning.space import PrunableUnit  # noqa: E402
from server.settings import Settings  # noqa: E402

BATCHES = (1, 8)


def rounded_keep(unit: PrunableUnit, keep: list[int], multiple: int) -> list[int]:
    """`keep` grown by the unit's lowest dropped gates until its channels are a multiple of `multiple` (or the unit is
    whole)."""
    if unit.kind.is_depth:
        return keep
    grown, spare = list(keep), [g for g in range(unit.num_gates) if g not in keep]
    while (len(grown) * unit.channels_per_gate) % multiple and spare:
        grown.append(spare.pop(0))
    return sorted(grown)


def run(args) -> dict:
    # Only the teacher is loaded: every code is sliced from it, and its encoder conditions the inputs of all.
    teacher = Settings(bundle=args.teacher, _env_file=None).load_pipeline()
    teacher_unet = teacher.experts[0]
    manifest = read_manifest(args.bundle)
    models: dict[str, torch.nn.Module] = {TEACHER: teacher_unet}
    costs: dict[str, int] = {TEACHER: teacher.teacher_macs}
    for entry in manifest.codes:
        info, _ = read_expert_info(Path(args.bundle) / entry.expert)
        space: ArchitectureSpace = info.space
        keep = space.keep_sets(info.arch)
        rounded = space.from_keep_sets({u.name: rounded_keep(u, keep[u.name], args.multiple) for u in space.units})
        for name, arch in ((f"code {entry.code}", info.arch), (f"code {entry.code} rounded", rounded)):
            sliced = slice_unet(copy.deepcopy(teacher_unet), space, arch).eval()
            models[name] = sliced.to(memory_format=torch.channels_last)
            costs[name] = space.macs(arch, manifest.resolution)
    rows = []
    for batch in BATCHES:
        medians = alternating_medians(models, guided_inputs(teacher, batch), args.repeats)
        for entry in manifest.codes:
            plain, rounded = f"code {entry.code}", f"code {entry.code} rounded"
            rows.append(
                {
                    "code": entry.code,
                    "batch": batch,
                    "mac_ratio": costs[plain] / costs[TEACHER],
                    "rounded_mac_ratio": costs[rounded] / costs[TEACHER],
                    "latency_ratio": medians[plain] / medians[TEACHER],
                    "rounded_latency_ratio": medians[rounded] / medians[TEACHER],
                    "rounded_over_plain_s": medians[rounded] / medians[plain],
                    "teacher_s": medians[TEACHER],
                }
            )
    return {"multiple": args.multiple, "repeats": args.repeats, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"# Widths rounded up to a multiple of {result['multiple']} channels",
        "",
        "Median guided call (2 rows per image), every model alternating within each repetition; ratios to the "
        "teacher's call in the same run. A code whose rounded MACs equal its own kept only multiples already: its "
        "last column is the noise (and order bias) of this comparison.",
        "",
        "| batch | code | MACs | MACs rounded | latency | latency rounded | rounded / as is (seconds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['batch']} | {row['code']} | {row['mac_ratio']:.3f} | {row['rounded_mac_ratio']:.3f} | "
            f"{row['latency_ratio']:.3f} | {row['rounded_latency_ratio']:.3f} | {row['rounded_over_plain_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("benchmarks/models/aptp-rich-0.4"))
    parser.add_argument("--teacher", type=Path, default=Path("benchmarks/models/teacher-rich"))
    parser.add_argument("--multiple", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/width-rounding"))
    parser.add_argument("--name", default="aptp-rich-0.4")
    args = parser.parse_args(argv)
    result = run(args)
    config = {key: str(value) for key, value in vars(args).items()}
    provenance = collect_provenance(bundles=[args.bundle, args.teacher], config=config)
    write_report(args.out, args.name, result, markdown(result), echo=True, provenance=provenance)


if __name__ == "__main__":
    main()
