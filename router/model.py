"""The architecture predictor, the K codes, and the inference `Router` (prompt -> code, score, MACs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from aptp.conditioning.encoder import EncoderConfig, PromptEncoder
from aptp.formats.files import (
    ModelFileError,
    load_matching_state,
    read_json_object,
    validate_description,
    write_description,
)
from pruning.space import ArchitectureSpace

from .assignment import balancing_offsets
from .difficulty import DifficultyHead, capacity_scores
from .gates import OFFSET, TEMPERATURE, depth_order, gumbel_sigmoid, nested_depth_logits, normalised_architecture

ROUTER_CONFIG = "config.json"
ROUTER_WEIGHTS = "model.safetensors"
CODE_OFFSETS = "code_offsets"
HELD_OPEN_LOGIT = 1e4


class RouterConfig(BaseModel):
    """Parameters:
    num_codes (`int`): K, the number of architecture codes.
    embed_dim (`int`): the prompt encoder's output size.
    temperature (`float`), offset (`float`): Gumbel-sigmoid settings (docs/method.md: 0.4 and 3).
    prune_depth (`bool`): whether codes may drop whole blocks (docs/method.md: yes). With `False` every depth gate is
        held open, in training and at inference, and only widths are searched.
    held_open (`list[int]`): width gates held open for every prompt and code, in training and at inference: a
        floor under each layer's width (see `training.search.SearchConfig.min_width`). Empty in docs/method.md.
    encoder (`EncoderConfig`): the frozen prompt encoder.
    difficulty_weight (`float`): weight of the capacity term in the routing scores (`router.difficulty`): with
        `0` (docs/method.md) there is no difficulty head and routing reads architecture similarity alone.
    """

    num_codes: int = Field(4, ge=1, le=256)
    embed_dim: int = Field(384, ge=1)
    temperature: float = Field(TEMPERATURE, gt=0)
    offset: float = OFFSET
    prune_depth: bool = True
    held_open: list[int] = Field(default_factory=list)
    encoder: EncoderConfig = EncoderConfig()
    difficulty_weight: float = Field(0.0, ge=0)


class ArchitecturePredictor(nn.Module):
    """Prompt embedding -> one logit per gate, in the architecture vector's layout (width, then depth). One Linear
    per unit (orthogonal init, zero bias); depth logits pass through the nested ordering.

    Parameters:
        space (`ArchitectureSpace`): the teacher's space.
        embed_dim (`int`): prompt embedding size.
    """

    def __init__(self, space: ArchitectureSpace, embed_dim: int):
        super().__init__()
        self.space = space
        self.heads = nn.ModuleList(nn.Linear(embed_dim, unit.num_gates) for unit in space.width_units)
        self.depth = nn.Linear(embed_dim, len(space.depth_units)) if space.depth_units else None
        for linear in [*self.heads, *([self.depth] if self.depth is not None else [])]:
            nn.init.orthogonal_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.depth_order = depth_order(space)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """`(B, embed_dim)` -> `(B, dim)` logits."""
        width = [head(embedding) for head in self.heads]
        if self.depth is None:
            return torch.cat(width, dim=-1)
        depth = nested_depth_logits(self.depth(embedding), self.depth_order)
        return torch.cat([*width, depth], dim=-1)


class ArchitectureCodes(nn.Module):
    """K learnable codes in the predictor's logit layout (`nn.Embedding(K, dim)`, orthogonal init). Depth entries
    go through the same nested ordering as the predictor's."""

    def __init__(self, space: ArchitectureSpace, num_codes: int):
        super().__init__()
        self.space = space
        self.embedding = nn.Embedding(num_codes, space.dim)
        nn.init.orthogonal_(self.embedding.weight)
        self.depth_order = depth_order(space)

    @torch.no_grad()
    def set_architectures(self, architectures: torch.Tensor, offset: float = OFFSET) -> None:
        """Set the codes so that their deterministic hard gates are `architectures` (`(K, dim)`, 0/1). The depth
        part of each must be nested: a prefix of the depth order kept (at least its first unit), the rest dropped."""
        architectures = self.space.check(architectures)
        if architectures.shape != self.embedding.weight.shape:
            expected = tuple(self.embedding.weight.shape)
            raise ValueError(f"expected {expected} architectures (one per code), got {tuple(architectures.shape)}")
        width = torch.where(architectures[:, : self.space.width_dim] > 0, 10.0, -10.0 - offset)
        depth_raw = torch.full((len(architectures), len(self.space.depth_units)), -10.0)
        for row, arch in enumerate(architectures):
            kept = arch[self.space.width_dim :][self.depth_order]  # in nesting order
            count = int(kept.sum())
            if count == 0 or not bool(kept[:count].all()):
                raise ValueError(f"code {row}: depth gates {kept.tolist()} are not nested along {self.depth_order}")
            depth_raw[row, self.depth_order[count - 1]] = 10.0
        self.embedding.weight.copy_(torch.cat([width, depth_raw], dim=1))

    def forward(self) -> torch.Tensor:
        """`(K, dim)` logits."""
        logits = self.embedding.weight
        if not self.space.depth_units:
            return logits
        width, depth = logits[:, : self.space.width_dim], logits[:, self.space.width_dim :]
        return torch.cat([width, nested_depth_logits(depth, self.depth_order)], dim=-1)


@dataclass
class Routing:
    """The router's decision for a batch of prompts.

    Parameters:
        codes (`torch.Tensor`): `(B,)` chosen code per prompt.
        scores (`torch.Tensor`): `(B,)` the prompt's score for its code (`Router.scores`).
        all_scores (`torch.Tensor`): `(B, K)` its score for every code.
        rankings (`torch.Tensor`): `(B, K)` every code, from the chosen one down the decision rule's order (what a
            request capped below its first choice falls back on).

    A code's cost is not here: it is fixed once the router is trained, so the pipeline counts it once at load
    (`RoutedPipeline.codes`) instead of on every routing call.
    """

    codes: torch.Tensor
    scores: torch.Tensor
    all_scores: torch.Tensor
    rankings: torch.Tensor


class RouterDescription(BaseModel):
    """`config.json` of a router folder: its config, the resolution its MACs are counted at, and the architecture
    space of the teacher it prunes (`ArchitectureSpace.to_dict`)."""

    model_config = ConfigDict(extra="forbid")

    router: RouterConfig
    resolution: int = Field(ge=1)
    space: dict[str, Any]


class Router(nn.Module):
    """Inference router: frozen encoder, predictor, codes. Deterministic and batch-invariant: noise-free gates,
    each prompt scored on its own row. A prompt goes to `argmax_k(score_k + code_offsets_k)`; the offsets are zero
    (the paper's plain argmax) until `balance` fits them to a sample of training prompts.

    Parameters:
        config (`RouterConfig`): sizes and gate settings.
        space (`ArchitectureSpace`): the teacher's space (with the serving text length).
        resolution (`int`): serving resolution for the MAC figures.
        encoder (`PromptEncoder`, *optional*): share an already loaded encoder.
    """

    def __init__(
        self,
        config: RouterConfig,
        space: ArchitectureSpace,
        resolution: int | None = None,
        encoder: PromptEncoder | None = None,
    ):
        super().__init__()
        self.config = config
        self.space = space
        self.resolution = resolution or space.default_resolution
        self.predictor = ArchitecturePredictor(space, config.embed_dim)
        self.codes = ArchitectureCodes(space, config.num_codes)
        self.difficulty = DifficultyHead(config.embed_dim) if config.difficulty_weight > 0 else None
        # Not in state_dict: fitted after training (so training checkpoints never carry it), saved with the router.
        self.register_buffer("code_offsets", torch.zeros(config.num_codes), persistent=False)
        held = torch.zeros(space.dim, dtype=torch.bool)
        if config.held_open:
            index = torch.as_tensor(config.held_open)
            if index.min() < 0 or index.max() >= space.width_dim:
                raise ValueError(
                    f"held_open: width gate indices must lie in [0, {space.width_dim}), got {config.held_open}"
                )
            held[index] = True
        if not config.prune_depth:
            held[space.width_dim :] = True
        # Derived from the config, so not in state_dict: every gate the router never closes.
        self.register_buffer("held_open", held, persistent=False)
        self._encoder = encoder

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            self._encoder = PromptEncoder(self.config.encoder, device=self.codes.embedding.weight.device)
        return self._encoder

    def gates(
        self, logits: torch.Tensor, noise: bool = False, generator=None, noise_scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Held-open gates sit far past any logistic noise draw: exactly 1, and no gradient reaches their logits.
        if self.held_open.any():
            logits = torch.where(self.held_open.to(logits.device), torch.full_like(logits, HELD_OPEN_LOGIT), logits)
        return gumbel_sigmoid(
            logits,
            self.config.temperature,
            self.config.offset,
            noise=noise,
            generator=generator,
            noise_scale=noise_scale,
        )

    def code_architectures(self) -> torch.Tensor:
        """`(K, dim)` hard architectures of the codes (non-empty guard applied)."""
        _, hard = self.gates(self.codes(), noise=False)
        return self.space.harden(hard.detach())

    def code_macs(self) -> list[int]:
        return [self.space.macs(arch, self.resolution) for arch in self.code_architectures()]

    @torch.no_grad()
    def scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """`(B, embed_dim)` prompt embeddings -> `(B, K)` scores: cosine similarities to the codes, plus the
        capacity term when the router has a difficulty head (`router.difficulty.capacity_scores`)."""
        _, prompt_gates = self.gates(self.predictor(embedding).double(), noise=False)
        _, code_gates = self.gates(self.codes().double(), noise=False)
        prompts = normalised_architecture(prompt_gates, self.space)  # (B, dim)
        codes = normalised_architecture(code_gates, self.space)  # (K, dim)
        # Row by row in float64, rounded: a GEMM's summation order can depend on the batch size, and identical
        # codes tie exactly; rounding makes ties (and so the argmax) the same whatever the batch.
        scores = (prompts[:, None, :] * codes[None, :, :]).sum(-1)  # (B, K)
        if self.difficulty is not None:
            ratios = self.space.prunable_ratio(code_gates, self.resolution)
            difficulty = self.difficulty(embedding.double())
            scores = scores + capacity_scores(difficulty, ratios, self.config.difficulty_weight)
        return (scores * 1e9).round() / 1e9

    @torch.no_grad()
    def route_embeddings(self, embedding: torch.Tensor) -> Routing:
        all_scores = self.scores(embedding)
        rankings = self._rank(all_scores)
        best = rankings[:, 0]
        return Routing(best, all_scores.gather(1, best[:, None]).squeeze(1), all_scores, rankings)

    def _rank(self, scores: torch.Tensor) -> torch.Tensor:
        """`(B, K)` similarities -> `(B, K)` codes, best first: the decision rule, one row at a time (ties keep the
        lower code first, as argmax does)."""
        return (scores + self.code_offsets.double()).argsort(dim=1, descending=True, stable=True)

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """`(B, K)` similarities -> `(B,)` codes: the decision rule's first choice."""
        return self._rank(scores)[:, 0]

    @torch.no_grad()
    def route(self, prompts: list[str]) -> Routing:
        """Route prompts to codes. A prompt's code never depends on the other prompts in the call."""
        return self.route_embeddings(self.encoder.encode(prompts).pooled)

    @torch.no_grad()
    def balance(self, embedding: torch.Tensor, epsilon: float = 0.002, iterations: int = 3000) -> list[float]:
        """Fit `code_offsets` so that a sample of training-prompt embeddings `(N, embed_dim)` splits about evenly
        over the codes, as the optimal-transport assignment splits them in training.

        Why: training assigns with Sinkhorn, which balances every batch, but the noise-free gates of inference can
        sit much closer to some codes than to others, so a plain argmax can crowd most prompts into one or two.
        The offsets are the transport problem's code potentials (`assignment.balancing_offsets`): one fixed number
        per code, so a prompt's code still depends on that prompt alone. Returns the share of the sample per code
        afterwards.
        """
        scores = self.scores(embedding)
        self.code_offsets.copy_(balancing_offsets(scores, epsilon, iterations).to(self.code_offsets))
        codes = self._choose(scores)
        return (torch.bincount(codes, minlength=self.config.num_codes).double() / len(codes)).tolist()

    # -------------------------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        description = RouterDescription(router=self.config, resolution=self.resolution, space=self.space.to_dict())
        write_description(folder / ROUTER_CONFIG, description)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self._file_state().items()}, str(folder / ROUTER_WEIGHTS)
        )
        return folder

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        encoder: PromptEncoder | None = None,
        sha256: str | None = None,
    ) -> Router:
        folder = Path(folder)
        path = folder / ROUTER_CONFIG
        description = validate_description(path, RouterDescription, read_json_object(path))
        try:
            space = ArchitectureSpace.from_dict(description.space)
            router = cls(description.router, space, description.resolution, encoder=encoder)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(folder / ROUTER_CONFIG, f"not a valid router description ({e})") from None
        state = load_matching_state(folder / ROUTER_WEIGHTS, router._file_state(), sha256, device)
        router.code_offsets.copy_(state.pop(CODE_OFFSETS))
        router.load_state_dict(state)
        return router.to(device).eval()

    def _file_state(self) -> dict[str, torch.Tensor]:
        return {**self.state_dict(), CODE_OFFSETS: self.code_offsets}


def router_folder(path: str | Path) -> Path | None:
    """The folder of the saved router at `path` (a folder, or its config.json: a config describing a router and the
    space it prunes), else None. Unreadable or other files say no; loading them names the problem."""
    path = Path(path)
    folder = path.parent if path.name == ROUTER_CONFIG and path.is_file() else path
    try:
        description = json.loads((folder / ROUTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return folder if isinstance(description, dict) and {"router", "space"} <= description.keys() else None


def describe_router(folder: str | Path, num_codes: int | None = None) -> dict[str, Any]:
    """A router folder's settings, from its `config.json` (the weights are not read); `num_codes`, when given, is
    what the router must have (a bundle's)."""
    path = Path(folder) / ROUTER_CONFIG
    router = validate_description(path, RouterDescription, read_json_object(path)).router
    if num_codes is not None and router.num_codes != num_codes:
        raise ModelFileError(path, f"router has {router.num_codes} codes, the bundle {num_codes}")
    return {
        "num_codes": router.num_codes,
        "embed_dim": router.embed_dim,
        "encoder": router.encoder.name,
        "prune_depth": router.prune_depth,
        "held_open_gates": len(router.held_open),
        "temperature": router.temperature,
        "offset": router.offset,
        "difficulty_weight": router.difficulty_weight,
    }
