"""Which per-sample signal says how much capacity a prompt needs: the search's difficulty target and candidates to
replace it, measured per tier on training-split scenes, before any search is run.

    .venv/bin/python benchmarks/difficulty.py --teacher benchmarks/models/teacher-rich --budget 0.36

For each tier and each phrasing (rich captions and templates) it draws scenes, noise and timesteps as the search
does, runs the teacher and a fixed L1-pruned network at `--budget`, each on the prompt and on the empty prompt, and
reports each target's mean per tier after the search's own per-timestep centring
(`router.difficulty.DifficultyTargets`): 0 is the average sample at its noise level, +0.69 twice its error. A target
that should send hard prompts to costly codes rates tiers 3-4 above tier 1. The targets (`TARGETS`):
- `output`: the search's (`router.difficulty.reference_error`), the pruned network's squared error against the
  teacher's prediction on the prompt;
- `relative`: that error over the prompt's effect on the teacher, its squared conditional-minus-unconditional
  prediction (the share of what the prompt asks that the pruned network misses, whatever area the objects cover);
- `effect`: the squared error of the pruned network's prompt effect against the teacher's, over the teacher's;
- `direction`: one minus the cosine between the two networks' prompt effects (where guidance pushes the image).
Writes `benchmarks/results/difficulty/<name>.json` and `.md` with provenance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aptp.formats.files import ModelFileError  # noqa: E402
from aptp.formats.report import collect_provenance, write_report  # noqa: E402
from aptp.sampling import denoise  # noqa: E402
from pruning.gates import UNetGates  # noqa: E402
from pruning.importance import l1_architecture_for_budget  # noqa: E402
from pruning.space import ArchitectureSpace  # noqa: E402
from router.difficulty import DifficultyTargets, reference_error  # noqa: E402
from training.data.labels import collate, images_to_unit_range  # noqa: E402
from training.data.shapes import ShapesDomain  # noqa: E402
from training.models import load_training_teacher  # noqa: E402
from training.noise import NoisyBatch  # noqa: E402

TIERS = (1, 2, 3, 4)
PHRASINGS = ("rich", "templates")
TARGETS = ("output", "relative", "effect", "direction")


def candidate_errors(
    reference: torch.Tensor, teacher: torch.Tensor, reference_empty: torch.Tensor, teacher_empty: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each of `TARGETS` `(B,)` from the two networks' predictions `(B, C, H, W)` on the prompt and on the empty
    prompt (see the module's docstring)."""
    teacher_effect = (teacher.float() - teacher_empty.float()).flatten(1)  # (B, C*H*W)
    reference_effect = (reference.float() - reference_empty.float()).flatten(1)
    effect_size = teacher_effect.pow(2).mean(dim=1).clamp_min(1e-12)
    output = reference_error(reference, teacher)
    return {
        "output": output,
        "relative": output / effect_size,
        "effect": (reference_effect - teacher_effect).pow(2).mean(dim=1) / effect_size,
        "direction": 1 - F.cosine_similarity(reference_effect, teacher_effect, dim=1),
    }


def measure(teacher_folder: str, budget: float, per_tier: int, batch: int, seed: int) -> dict:
    teacher = load_training_teacher(teacher_folder)
    unet, spec = teacher.unet, teacher.spec
    space = ArchitectureSpace.from_unet(unet, text_len=teacher.text_len)
    reference = l1_architecture_for_budget(unet, space, budget, spec.resolution)
    scheduler = DDPMScheduler.from_config(spec.scheduler_config)
    gates = UNetGates(unet, space).attach()
    empty = teacher.conditioner.encode([""])
    # one shuffled stream of every (phrasing, tier) so the centring's moving averages see them mixed, as in training
    rows = [(p, t, i) for p in PHRASINGS for t in TIERS for i in range(per_tier)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [rows[k] for k in order]
    centring = {name: DifficultyTargets(scheduler.config.num_train_timesteps) for name in TARGETS}
    values: dict[str, list[float]] = {name: [] for name in TARGETS}
    domains = {
        (p, t): ShapesDomain(seed, "train", tier_weights=tuple(float(k == t) for k in TIERS), phrasing=p)
        for p in PHRASINGS
        for t in TIERS
    }
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        samples = [domains[(p, t)].sample(i) for p, t, i in chunk]
        images = images_to_unit_range(collate(samples)[0])
        generator = torch.Generator().manual_seed(seed * 7919 + start)
        x0 = teacher.to_model_space(images, generator)
        noisy = NoisyBatch.make(scheduler, x0, generator, gamma=5.0)
        encoded = teacher.conditioner.encode([s.caption for s in samples])
        with torch.no_grad():
            predictions = []
            for architecture in (None, reference):  # the teacher, then the pruned network
                gates.set(architecture)
                for conditioning in (encoded, empty.repeat(len(samples))):
                    predictions.append(denoise(unet, noisy.noisy, noisy.timesteps, conditioning).sample)
            gates.set(None)
        teacher_out, teacher_empty, reference_out, reference_empty = predictions
        errors = candidate_errors(reference_out, teacher_out, reference_empty, teacher_empty)
        for name in TARGETS:
            values[name] += centring[name](errors[name].clamp_min(1e-12), noisy.timesteps).tolist()
    gates.detach()
    result: dict = {"budget": budget, "per_tier": per_tier, "targets": {}}
    for name in TARGETS:
        table = {}
        for phrasing in PHRASINGS:
            table[phrasing] = {
                str(t): round(
                    sum(v for v, (p, tt, _) in zip(values[name], rows, strict=True) if p == phrasing and tt == t)
                    / per_tier,
                    4,
                )
                for t in TIERS
            }
        result["targets"][name] = table
    return result


def markdown(result: dict, name: str) -> str:
    lines = [
        f"# Difficulty targets per tier ({name})",
        "",
        f"Reference: the L1-pruned network at {result['budget']} of the teacher's MACs; {result['per_tier']} "
        "training-split scenes per tier and phrasing. Each value is the mean centred log target (0: the average "
        "sample at its noise level); a target that asks capacity for hard prompts rates tiers 3-4 above tier 1.",
        "",
        "| target | phrasing | tier 1 | tier 2 | tier 3 | tier 4 | tiers 3-4 minus tier 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for target, table in result["targets"].items():
        for phrasing, tiers in table.items():
            gap = (tiers["3"] + tiers["4"]) / 2 - tiers["1"]
            cells = " | ".join(f"{tiers[str(t)]:+.3f}" for t in TIERS)
            lines.append(f"| {target} | {phrasing} | {cells} | {gap:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="benchmarks/models/teacher-rich")
    parser.add_argument("--budget", type=float, default=0.36, help="MACs (x teacher) of the L1-pruned reference")
    parser.add_argument("--per-tier", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="teacher-rich")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/difficulty"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        result = measure(args.teacher, args.budget, args.per_tier, args.batch, args.seed)
    except ModelFileError as e:
        parser.error(f"--teacher: {e}")
    except ValueError as e:  # the only other refusal: a budget under what L1 pruning can reach
        parser.error(f"--budget: {e}")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    provenance = collect_provenance([args.teacher], config=config)
    write_report(args.out, args.name, result, markdown(result, args.name), echo=True, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
