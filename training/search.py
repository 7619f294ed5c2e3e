"""`aptp train search`: phase 1 of APTP, the architecture search with the teacher frozen (docs/method.md).

Per step: the predictor reads each prompt, Sinkhorn assigns prompts to the K codes (uniform marginals, no
gradient), the teacher U-Net runs gated by each prompt's code (its own predictor draw during warm-up), and the
losses are denoising + output/feature distillation against the ungated teacher + resource + contrastive + spread.
Logged per step: every loss, the routed prunable-MAC ratio, each code's MAC ratio and usage. Resumable.

With `difficulty_weight` (not in docs/method.md) the router also learns each prompt's difficulty: a fixed L1-pruned
network runs beside the teacher on every sample, its error against the teacher is the target of the router's
difficulty head (`router.difficulty`), and the assignment's scores get the capacity term, so harder prompts go to
costlier codes. It costs one more no-grad U-Net forward per step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

from aptp.conditioning.encoder import EncoderConfig, PromptEncoder
from aptp.sampling import denoise
from pruning.gates import UNetGates
from pruning.importance import l1_architecture_for_budget, l1_floor, l1_importance, width_floor_cost
from pruning.space import ArchitectureSpace
from router.assignment import assign
from router.difficulty import DifficultyTargets, capacity_scores, reference_error
from router.gates import normalised_architecture
from router.losses import code_resource_loss, contrastive_loss, prunable_budget, resource_loss, spread_losses
from router.model import Router, RouterConfig

from .config import ConfigError
from .data.captions import CaptionFolderConfig, TrainingData, read_prompt_file, training_data
from .distill import DistillLosses, block_features, student_losses
from .distributed import Processes
from .models import load_training_teacher
from .noise import NoisyBatch
from .run import RunSettings, TrainingRun, check_finite


class LossWeights(BaseModel):
    """docs/method.md's weights (from the authors' configs)."""

    model_config = ConfigDict(extra="forbid")

    denoise: float = 1.0
    output: float = 0.2
    features: float = 0.2
    resource: float = 2.0
    contrastive: float = 100.0
    spread_std: float = 0.1
    spread_max: float = 0.1


class SearchConfig(RunSettings):
    """Config of `aptp train search` (see configs/shapes/search.yaml)."""

    # Re-running a finished search with other balance settings only re-fits the code offsets.
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = RunSettings.RESUME_MAY_CHANGE | {
        "balance_prompts",
        "balance_epsilon",
        "balance_prompts_file",
    }

    teacher: str = "bundles/shapes/teacher"
    out: str = "runs/search-shapes"
    seed: int = 1
    num_codes: int = Field(4, ge=1)
    budget: float = Field(0.6, gt=0, le=1, description="target average MACs as a fraction of the teacher's")
    code_budgets: list[float] | None = Field(
        None,
        description="one target per code (fractions of the teacher's MACs, averaging `budget`): after the warm-up "
        "each code is held to its own target instead of the routed batch to the average, so the codes differ in "
        "cost by design; None: the batch average only (docs/method.md)",
    )
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float | None = Field(None, gt=0, description="default: 2e-4 * sqrt(batch_size), as in the paper")
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    noise_anneal: tuple[float, float] | None = Field(
        None,
        description="(start, end) fractions of the steps over which the gates' logistic noise falls linearly to 0; "
        "None: full noise throughout (docs/method.md)",
    )
    lr_warmup_steps: int = Field(100, ge=0)
    use_ot: bool = True
    prune_depth: bool = Field(True, description="False: hold every block and search widths only")
    min_width: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of each width unit's gates held open (those of largest L1 norm in the teacher), a floor "
        "under every layer's width; 0: none (docs/method.md)",
    )
    sinkhorn_epsilon: float = Field(0.05, gt=0)
    sinkhorn_iterations: int = Field(3, ge=1)
    contrastive_tau: float = Field(0.03, gt=0)
    balance_prompts: int = Field(
        20_000, ge=0, description="training prompts the code offsets are fitted on after training; 0: plain argmax"
    )
    balance_prompts_file: Path | None = Field(
        None,
        description="a prompt file (one a line) like the traffic the bundle will serve: the code offsets are fitted "
        "on its first `balance_prompts` prompts instead of the training prompts, so that codes split that traffic "
        "evenly and its routed average lands on the budget",
    )
    balance_epsilon: float = Field(0.002, gt=0)
    difficulty_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the capacity term in the routing scores: the router learns each prompt's difficulty "
        "(how far a fixed pruned network falls from the teacher on it) and sends harder prompts to costlier codes, "
        "most useful with `code_budgets`; 0: no difficulty head, routing by architecture similarity (docs/method.md)",
    )
    difficulty_reference: float | None = Field(
        None,
        gt=0,
        le=1,
        description="MACs (x teacher) of the L1-pruned network whose error rates the difficulty; default: the "
        "cheapest code's target, else the budget, and at least the cheapest L1 network (one gate a width unit)",
    )
    difficulty_lr: float = Field(1e-3, gt=0, description="learning rate of the difficulty head")
    min_snr_gamma: float = Field(5.0, gt=0)
    weights: LossWeights = LossWeights()
    data: CaptionFolderConfig | None = Field(
        None, description="an image-caption folder to train on; default: the embedded shapes domain"
    )
    encoder: EncoderConfig | None = Field(None, description="default: the teacher's text encoder")
    embed_encoder: EncoderConfig | None = Field(
        None, description="router's prompt encoder if different from the teacher's (e.g. all-mpnet-base-v2)"
    )

    @model_validator(mode="after")
    def _code_budgets_average_the_budget(self) -> SearchConfig:
        targets = self.code_budgets
        if targets is None:
            return self
        if len(targets) != self.num_codes:
            raise ValueError(f"code_budgets: {len(targets)} targets for num_codes={self.num_codes}")
        if not all(0 < t <= 1 for t in targets):
            raise ValueError(f"code_budgets: every target must be in (0, 1], got {targets}")
        mean = sum(targets) / len(targets)
        if abs(mean - self.budget) > 0.005:
            raise ValueError(
                f"code_budgets: they average {mean:.3f}, not the budget {self.budget} (prompts split evenly)"
            )
        return self

    @field_validator("noise_anneal")
    @classmethod
    def _anneal_inside_the_run(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1] <= 1:
            raise ValueError(f"need 0 <= start < end <= 1, got {list(value)}")
        return value

    def noise_scale(self, step: int) -> float:
        """Scale of the gates' logistic noise at `step`: 1, then a linear fall to 0 over `noise_anneal`."""
        if self.noise_anneal is None:
            return 1.0
        start, end = (round(f * self.steps) for f in self.noise_anneal)
        return min(1.0, max(0.0, (end - 1 - step) / max(1, end - 1 - start)))


def width_floor(unet: torch.nn.Module, space: ArchitectureSpace, min_width: float) -> list[int]:
    """Indices of the gates `min_width` holds open: in each width unit, the ceil(min_width x gates) of largest L1
    norm (the static baseline's ranking, `pruning.importance.l1_importance`)."""
    if min_width == 0:
        return []
    importance = l1_importance(unet, space)
    held: list[int] = []
    for unit in space.width_units:
        sl = space.slices[unit.name]
        count = math.ceil(min_width * unit.num_gates)
        held += (importance[sl].topk(count).indices + sl.start).sort().values.tolist()
    return held


def check_targets_above_floor(config: SearchConfig, space: ArchitectureSpace, resolution: int) -> float | None:
    """The cost of the cheapest network `min_width` leaves, after refusing a target no code can reach: with widths
    searched only, the gates the floor holds open cost a share of the teacher's MACs that every code pays, and a code
    held to less sits at the floor, pulling the average over the budget (`router.losses.prunable_budget` checks the
    unprunable part alone). None where there is no such floor (`min_width` 0, or depth pruned with it)."""
    if config.min_width == 0 or config.prune_depth:  # no floor, or blocks that may drop with the gates held in them
        return None
    cheapest = width_floor_cost(space, config.min_width, resolution)
    option, targets = ("code_budgets", config.code_budgets) if config.code_budgets else ("budget", [config.budget])
    below = [target for target in targets if target < cheapest]
    if below:
        raise ConfigError(
            f"{option}: {below} below {cheapest:.3f} of the teacher's MACs, the cheapest network that "
            f"min_width={config.min_width} leaves (each layer keeps its strongest gates): lower min_width or raise "
            "the targets"
        )
    return cheapest


def balance_prompts(config: SearchConfig, data: TrainingData) -> tuple[list[str], str]:
    """The prompts the code offsets are fitted on, and where they come from: `config.balance_prompts` of
    `balance_prompts_file`, else of the training data. Read before training, so a bad file fails the run at once."""
    if config.balance_prompts_file is not None:
        return read_prompt_file(config.balance_prompts_file)[: config.balance_prompts], str(config.balance_prompts_file)
    return data.captions(range(min(config.balance_prompts, len(data)))), "training"


def balance_codes(
    router: Router, encoder: PromptEncoder, prompts: tuple[list[str], str], config: SearchConfig, run: TrainingRun
) -> None:
    """Fit the router's code offsets on `prompts` (`balance_prompts`) and log the shares per code before and after
    (see `Router.balance`). Runs again, cheaply, when a finished run is started once more."""
    captions, source = prompts
    chunks = [captions[i : i + 256] for i in range(0, len(captions), 256)]
    embedding = torch.cat([encoder.encode(chunk).pooled for chunk in tqdm(chunks, desc="balancing codes")])
    router.code_offsets.zero_()
    before = torch.bincount(router.route_embeddings(embedding).codes, minlength=config.num_codes) / len(captions)
    after = router.balance(embedding, epsilon=config.balance_epsilon)
    run.log(
        {
            "step": config.steps,
            "phase": "balance",
            "balance_source": source,
            "balance_count": len(captions),
            "code_share_argmax": [round(v, 4) for v in before.tolist()],
            "code_share_balanced": [round(v, 4) for v in after],
            "code_offsets": [round(v, 6) for v in router.code_offsets.tolist()],
        }
    )
    print(f"code shares of {len(captions)} {source} prompts: argmax {before.tolist()} -> balanced {after}")


def run_search(config: SearchConfig) -> Path:
    """Run (or resume) phase 1; writes `router/` (the trained router) and `log.jsonl` to `config.out`."""
    processes = Processes(config.device, config.mixed_precision)
    device = processes.device
    share = processes.share(config.batch_size)  # this process's rows of each step's global batch
    teacher = load_training_teacher(config.teacher, device, config.encoder, config.embed_encoder)
    unet, spec = teacher.unet, teacher.spec
    unet.train()  # no dropout or batch norm in these U-Nets; train mode only matters for gradient checkpointing
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    space = ArchitectureSpace.from_unet(unet, text_len=teacher.text_len)
    resolution = spec.resolution
    text_encoder, embed_encoder = teacher.conditioner, teacher.router_encoder
    check_targets_above_floor(config, space, resolution)
    held_open = width_floor(unet, space, config.min_width)
    torch.manual_seed(config.seed)
    router_config = RouterConfig(
        num_codes=config.num_codes,
        embed_dim=embed_encoder.embed_dim,
        encoder=embed_encoder.config,
        prune_depth=config.prune_depth,
        held_open=held_open,
        difficulty_weight=config.difficulty_weight,
    )
    router = Router(router_config, space, resolution, encoder=embed_encoder).to(device)
    lr = config.lr or 2e-4 * math.sqrt(config.batch_size)
    groups = [{"params": [*router.predictor.parameters(), *router.codes.parameters()], "initial_lr": lr}]
    scheduler = DDPMScheduler.from_config(spec.scheduler_config)
    modules: dict[str, torch.nn.Module] = {"router": router}
    reference = None  # the fixed pruned network that rates each training prompt's difficulty
    if router.difficulty is not None:
        groups.append({"params": list(router.difficulty.parameters()), "initial_lr": config.difficulty_lr})
        # A code may go under the L1 floor (depth pruning); the reference only rates prompts, so by default it stops
        # at the floor, while an explicit reference budget under it is refused
        cheapest = max(min(config.code_budgets or [config.budget]), l1_floor(space, resolution))
        try:
            reference = l1_architecture_for_budget(unet, space, config.difficulty_reference or cheapest, resolution)
        except ValueError as e:
            raise ConfigError(f"difficulty_reference: {e}") from None
        reference = reference.to(device)
        modules["difficulty_targets"] = DifficultyTargets(scheduler.config.num_train_timesteps).to(device)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    total, prunable = space.total_macs(resolution), space.prunable_macs(resolution)
    budget = prunable_budget(config.budget, total, prunable)
    code_targets = None
    if config.code_budgets is not None:
        code_targets = torch.tensor([prunable_budget(b, total, prunable) for b in config.code_budgets], device=device)
    data = training_data(config.data, teacher.pixel_resolution, config.seed, config.phrasing)
    prompts_to_balance = balance_prompts(config, data) if config.balance_prompts and processes.is_main else None
    teacher.use_latent_cache(data, processes)
    gates = UNetGates(unet, space).attach()
    warmup_steps = int(config.warmup_fraction * config.steps)
    w = config.weights

    run = TrainingRun(config, modules, optimizer, main=processes.is_main, scaler=processes.scaler)
    start = run.resume()
    steps = range(start, config.steps)
    progress = tqdm(steps, desc="search", initial=start, total=config.steps, disable=not processes.is_main)
    for step in progress:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        positions = range(step * config.batch_size, (step + 1) * config.batch_size)
        x0, captions = teacher.samples(data, positions[share], generator, share, config.batch_size)
        encoded = text_encoder.encode(captions)
        # The router's side runs on the global batch (see training.distributed).
        embedding = teacher.router_embedding(captions if processes.world == 1 else data.captions(positions), encoded)
        batch = NoisyBatch.make(scheduler, x0, generator, config.min_snr_gamma, share, config.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * min(1.0, (step + 1) / max(1, config.lr_warmup_steps))

        noise_scale = config.noise_scale(step)
        prompt_soft, prompt_hard = router.gates(
            router.predictor(embedding), noise=True, generator=generator, noise_scale=noise_scale
        )
        code_soft, code_hard = router.gates(
            router.codes(), noise=True, generator=generator, noise_scale=noise_scale
        )  # (K, dim)
        drawn_ratios = space.prunable_ratio(code_hard, resolution).float()  # (K,) of this step's code draws
        difficulty = router.difficulty(embedding) if router.difficulty is not None else None  # (B,)
        with torch.no_grad():
            scores = normalised_architecture(prompt_hard, space) @ normalised_architecture(code_hard, space).T
            if difficulty is not None:
                scores = scores + capacity_scores(difficulty.detach(), drawn_ratios.detach(), config.difficulty_weight)
            if config.use_ot:
                codes = assign(scores, config.sinkhorn_epsilon, config.sinkhorn_iterations)
            else:
                codes = scores.argmax(dim=1)
        warming_up = step < warmup_steps
        soft, hard = (prompt_soft, prompt_hard) if warming_up else (code_soft[codes], code_hard[codes])

        optimizer.zero_grad(set_to_none=True)
        # The U-Net side's gradient reaches the router through the gates alone: collect it on a leaf, part by
        # part (each part's activations are freed after its backward), then pass it on with the router side's.
        local_soft = soft[share]
        gate_leaf = local_soft.detach().requires_grad_(True)
        parts = Processes.parts(len(captions), config.gradient_accumulation_steps)
        part_losses, reference_errors = [], []
        for part in parts:  # the U-Net side, one pass per part; its gradients accumulate into the router's
            with torch.no_grad(), processes.autocast(), block_features(unet) as teacher_features:
                gates.set(None)
                teacher_out = denoise(unet, batch.select(part).noisy, batch.timesteps[part], encoded.select(part))
            if reference is not None:
                with torch.no_grad(), processes.autocast():
                    gates.set(reference)
                    out = denoise(unet, batch.select(part).noisy, batch.timesteps[part], encoded.select(part))
                reference_errors.append(reference_error(out.sample, teacher_out.sample))
            gates.set(gate_leaf[part])  # held through backward: gradient checkpointing recomputes the gated forward
            with processes.autocast():
                losses = student_losses(
                    unet, None, batch.select(part), encoded.select(part), teacher_out.sample, list(teacher_features)
                )
            processes.scale(losses.weighted(w.denoise, w.output, w.features) / len(parts)).backward()
            gates.set(None)
            part_losses.append(losses)
        distill = DistillLosses.mean(part_losses)
        ratios = space.prunable_ratio(hard, resolution).float()  # (B,) of the global batch
        if code_targets is None or warming_up:
            resource = resource_loss(ratios, budget)
        else:  # every code to its own target; the even split of prompts keeps the average at the budget
            resource = code_resource_loss(drawn_ratios, code_targets)
        spread_std, spread_max = spread_losses(ratios)
        contrastive = contrastive_loss(
            normalised_architecture(prompt_hard, space), embedding, tau=config.contrastive_tau
        )
        router_side = (
            w.resource * resource + w.contrastive * contrastive + w.spread_std * spread_std + w.spread_max * spread_max
        )
        if difficulty is not None:  # the head learns from this process's rows, whose reference errors it has
            targets = modules["difficulty_targets"](torch.cat(reference_errors), batch.timesteps)
            difficulty_loss = F.mse_loss(difficulty[share], targets)
            router_side = router_side + difficulty_loss
        (processes.scale(router_side) + (local_soft * gate_leaf.grad).sum()).backward()  # the leaf's grad is scaled
        loss = distill.weighted(w.denoise, w.output, w.features).detach() + router_side.detach()
        processes.step(optimizer, list(router.parameters()))
        check_finite(loss, step, run)

        if run.should_log(step, config.steps):
            with torch.no_grad():
                code_ratios = space.prunable_ratio(router.code_architectures().to(device), resolution)
                usage = torch.bincount(codes, minlength=config.num_codes).float() / len(codes)
            record = {
                "step": step,
                "phase": "warmup" if warming_up else "codes",
                "processes": processes.world,
                "loss": round(loss.item(), 5),
                "denoise": round(distill.denoise.item(), 5),
                "output": round(distill.output.item(), 5),
                "features": round(distill.features.item(), 5),
                "resource": round(resource.item(), 5),
                "contrastive": round(contrastive.item(), 6),
                "spread_std": round(spread_std.item(), 5),
                "spread_max": round(spread_max.item(), 5),
                "noise_scale": round(noise_scale, 4),
                "routed_prunable_ratio": round(ratios.mean().item(), 4),
                "target_prunable_ratio": round(budget, 4),
                **(
                    {"code_target_ratios": [round(t, 4) for t in code_targets.tolist()]}
                    if code_targets is not None
                    else {}
                ),
                "code_prunable_ratio": [round(r, 4) for r in code_ratios.tolist()],
                "code_usage": [round(u, 4) for u in usage.tolist()],
            }
            if difficulty is not None:
                record["difficulty"] = round(difficulty_loss.item(), 5)
                # Whether harder-rated prompts went to costlier codes this step (Pearson, over the global batch).
                pair = torch.stack([difficulty.detach(), drawn_ratios.detach()[codes]])
                record["difficulty_cost_correlation"] = round(torch.corrcoef(pair)[0, 1].nan_to_num().item(), 4)
            run.log(record)
            progress.set_postfix(loss=f"{loss.item():.3f}", ratio=f"{ratios.mean().item():.2f}", refresh=False)
        run.maybe_save(step + 1)
    run.save(config.steps)
    gates.detach()
    if not processes.is_main:  # the main process balances and writes the router
        processes.wait()
        return run.folder / "router"
    if config.balance_prompts:
        balance_codes(router, embed_encoder, prompts_to_balance, config, run)
    router.cpu().save(run.folder / "router")
    processes.wait()
    print(f"router written to {run.folder / 'router'} ({run.state['elapsed_seconds'] / 60:.1f} min)")
    return run.folder / "router"
