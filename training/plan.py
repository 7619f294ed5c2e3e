"""`aptp train JOB --dry-run`: what a run would do, from configs alone (no weights are read, nothing is trained).

It reads the teacher's U-Net config (a teacher folder, a diffusers pipeline folder, or a bare U-Net config folder
such as `configs/unets/sd-2.1`), builds the architecture space on the `meta` device and prints the plan: the space,
MACs per U-Net call (and, for a pipeline, the VAE decoder's and text encoder's), the budget and its target on the
prunable part, steps, batch and learning rates."""

from __future__ import annotations

import math
from pathlib import Path

from aptp.formats.describe import describe_model
from router.losses import prunable_budget

from .baseline import BaselineConfig
from .config import ConfigError
from .finetune import FinetuneConfig
from .search import SearchConfig, check_targets_above_floor


def _g(macs: float) -> str:
    return f"{macs / 1e9:.2f} GMACs"


def plan(config: SearchConfig | FinetuneConfig | BaselineConfig) -> str:
    """The plan of a search, fine-tuning or baseline run as text. A budget the run would refuse (under the cheapest
    network the search's width floor or L1 pruning leaves) is refused here too."""
    teacher = Path(config.teacher)
    try:
        report, space, _ = describe_model(teacher)
    except (FileNotFoundError, ValueError) as e:  # no folder, no U-Net config in it, or one that does not build
        raise ConfigError(f"teacher: {e}") from None
    total, prunable = report["total_macs"], report["prunable_macs"]
    side = report["resolution"][0]
    pixels = report.get("pixel_resolution", [None])[0]
    lines = [
        f"teacher          {teacher} ({report['kind']}): {report['params'] / 1e6:.1f} M parameters",
        f"U-Net input      {side}x{side}"
        + (f" latents ({pixels}x{pixels} pixels)" if pixels else "")
        + f", cross-attention over {report['text_len']} tokens",
        f"space            {report['architecture_dim']} gates over {len(report['units'])} units",
        f"MACs per call    {_g(total)} ({_g(prunable)} prunable, {prunable / total:.1%})",
    ]
    if "vae_decoder_macs_per_image" in report:
        lines.append(
            f"outside the U-Net {_g(report['vae_decoder_macs_per_image'])} VAE decoder per image, "
            f"{_g(report['text_encoder_macs_per_prompt'])} text encoder per prompt"
        )
    data = getattr(config, "data", None)
    lines.append(f"data             {data.folder if data else 'the embedded shapes domain'}")
    if isinstance(config, SearchConfig):
        target = prunable_budget(config.budget, total, prunable)
        lr = config.lr or 2e-4 * math.sqrt(config.batch_size)
        w = config.weights
        floor = check_targets_above_floor(config, space, side)
        floor_note = f" (no code under {floor:.3f} of the teacher's MACs)" if floor is not None else ""
        lines += [
            f"budget           p = {config.budget} of the teacher's MACs -> {target:.3f} of the prunable part "
            f"({_g(config.budget * total)} per call on average)",
            f"codes            K = {config.num_codes}; depth pruning {'on' if config.prune_depth else 'off'}; "
            f"width floor {config.min_width}{floor_note}",
            f"steps            {config.steps} ({int(config.warmup_fraction * config.steps)} predictor warm-up), "
            f"batch {config.batch_size}, lr {lr:.2e} (AdamW, {config.lr_warmup_steps} warm-up steps)",
            f"assignment       Sinkhorn eps {config.sinkhorn_epsilon}, {config.sinkhorn_iterations} iterations"
            f"{'' if config.use_ot else ' (off: argmax)'}; contrastive tau {config.contrastive_tau}",
            f"loss weights     denoise {w.denoise}, output {w.output}, features {w.features}, resource {w.resource}, "
            f"contrastive {w.contrastive}, spread {w.spread_std}/{w.spread_max}",
        ]
    else:
        e = config.expert
        if isinstance(config, FinetuneConfig):
            lines.append(
                f"router           {config.router}; routing pool {config.routing_prompts} prompts; shared stage "
                f"{config.shared_steps} steps"
            )
        else:
            floor = config.check_budget(space, side)
            lines.append(
                f"budget           p = {config.budget} (one L1-norm architecture for every prompt; L1 pruning's "
                f"cheapest network costs {floor:.4f})"
            )
        lines.append(
            f"fine-tuning      {e.steps} steps per expert, batch {e.batch_size}, lr {e.lr:.2e} ({e.lr_schedule}, "
            f"{e.warmup_steps} warm-up), weights {e.denoise_weight}/{e.output_weight}/{e.features_weight}"
        )
    runtime = f"device {config.device}, mixed precision {config.mixed_precision}, gradient checkpointing "
    runtime += (
        f"{'on' if config.gradient_checkpointing else 'off'}, {config.gradient_accumulation_steps} pass(es) per step"
    )
    if hasattr(config, "teacher_dtype"):
        runtime += f", frozen teacher in {config.teacher_dtype}"
    lines.append(f"runtime          {runtime} (batch_size is global: each of N processes runs 1/N of it)")
    lines.append(f"writes           {config.out}" + (f", bundle {config.export}" if hasattr(config, "export") else ""))
    return "\n".join(lines)
