"""Prompt difficulty, the router's signal for capacity: how much a prompt loses when the U-Net is pruned. The search
measures it on every training sample (a fixed pruned network's output against the teacher's) and the router learns
to predict it from the prompt alone, so that routing can send hard prompts to costly codes and easy ones to cheap
codes while the codes' shares, and so the average cost, stay where the search put them (`capacity_scores`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reference_error(reference: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """What rates a training sample's difficulty: the mean squared error `(B,)` of the reference (pruned) network's
    predictions `(B, C, H, W)` against the teacher's on the same noisy input, in float32."""
    return (reference.float() - teacher.float()).pow(2).mean(dim=(1, 2, 3))


class DifficultyHead(nn.Module):
    """Prompt embedding `(B, embed_dim)` -> predicted difficulty `(B,)`: the log of how far a pruned U-Net's output
    falls from the teacher's on the prompt, against the average prompt at the same noise level (0 is average, +0.69
    twice the average error). Two layers; the last starts at zero, so an untrained head rates every prompt average
    and routes as if it were absent. Runs in the embedding's dtype (the router scores in float64)."""

    def __init__(self, embed_dim: int, hidden: int = 128):
        super().__init__()
        self.hidden = nn.Linear(embed_dim, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
            return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))

        return linear(F.gelu(linear(embedding, self.hidden)), self.out).squeeze(-1)


class DifficultyTargets(nn.Module):
    """Per-sample errors of the reference network -> the head's targets: the log error less the running mean of the
    log error at that noise level. The error's scale follows the timestep far more than the prompt, so each sample
    is compared with earlier samples of about the same timestep (`bins` equal bins of the training timesteps, each
    an exponential moving average). Its buffers go in the search's checkpoint, not in the router. In a run of
    several processes each keeps its own averages (of its own rows)."""

    def __init__(self, num_train_timesteps: int, bins: int = 20, decay: float = 0.98):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.decay = decay
        self.register_buffer("means", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(bins, dtype=torch.bool))

    @torch.no_grad()
    def forward(self, errors: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`errors` `(B,)` (mean squared, > 0) at `timesteps` `(B,)` -> targets `(B,)`, then the averages move on.
        A bin's first samples are measured against their own mean."""
        bins = len(self.means)
        index = (timesteps.long() * bins // self.num_train_timesteps).clamp(0, bins - 1).to(self.means.device)
        log_error = errors.double().clamp_min(1e-30).log().to(self.means.device)
        counts = torch.bincount(index, minlength=bins)
        batch_means = torch.zeros(bins, dtype=torch.float64, device=self.means.device).index_add_(0, index, log_error)
        batch_means = batch_means / counts.clamp_min(1)
        present = counts > 0
        first = present & ~self.seen
        self.means[first] = batch_means[first]
        targets = log_error - self.means[index]
        moving = present & ~first
        self.means[moving] = self.decay * self.means[moving] + (1 - self.decay) * batch_means[moving]
        self.seen |= present
        return targets.to(errors.device, torch.float32)


def capacity_scores(difficulty: torch.Tensor, code_ratios: torch.Tensor, weight: float) -> torch.Tensor:
    """`weight x difficulty_b x (R_k - mean_k R_k)` `(B, K)`, added to the routing scores: for a hard prompt
    (difficulty > 0) it raises the score of the codes costlier than average and lowers the cheaper ones', for an easy
    prompt the other way. Under an even split of prompts over codes (the transport plan in training, the balancing
    offsets at inference) the harder prompts then take the costly codes and the average cost stays put. Codes of
    equal cost get no term. `code_ratios` `(K,)` are the codes' prunable-MAC ratios."""
    centred = code_ratios - code_ratios.mean()
    return weight * difficulty[:, None].to(centred.dtype) * centred[None, :]
