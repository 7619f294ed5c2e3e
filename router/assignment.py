"""Optimal-transport assignment of prompts to codes (Sinkhorn-Knopp), which keeps every code in use, and the
per-code offsets that carry the same balance to inference without making a prompt's code depend on its batch."""

from __future__ import annotations

import math

import torch


def _log_potentials(
    scores: torch.Tensor, epsilon: float, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn with uniform marginals: returns (log_kernel, log_u, log_v), float64."""
    batch, codes = scores.shape
    log_kernel = scores.double() / epsilon  # (B, K)
    log_a = torch.full((batch,), -math.log(batch), dtype=torch.float64, device=scores.device)
    log_b = torch.full((codes,), -math.log(codes), dtype=torch.float64, device=scores.device)
    log_u = torch.zeros(batch, dtype=torch.float64, device=scores.device)
    log_v = torch.zeros(codes, dtype=torch.float64, device=scores.device)
    for _ in range(iterations):
        # POT updates v from the column marginals first, then u from the row marginals.
        log_v = log_b - torch.logsumexp(log_kernel + log_u[:, None], dim=0)
        log_u = log_a - torch.logsumexp(log_kernel + log_v[None, :], dim=1)
    return log_kernel, log_u, log_v


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Entropic OT plan between B prompts and K codes with uniform marginals, maximising total `scores` (B, K).

    Equivalent to POT's `ot.sinkhorn(ones(B) / B, ones(K) / K, -scores, epsilon, numItermax=iterations)`; written
    in torch so it runs batched on the training device. Works in the log domain for stability at small epsilon.
    Returns the plan `(B, K)` (rows sum to about 1/B after the final row update).
    """
    log_kernel, log_u, log_v = _log_potentials(scores, epsilon, iterations)
    return torch.exp(log_u[:, None] + log_kernel + log_v[None, :]).to(scores.dtype)


def assign(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Hard code per prompt: argmax of the Sinkhorn plan's rows, `(B,)`. No gradient flows through it."""
    return sinkhorn(scores, epsilon, iterations).argmax(dim=1)


@torch.no_grad()
def balancing_offsets(scores: torch.Tensor, epsilon: float = 0.002, iterations: int = 3000) -> torch.Tensor:
    """Per-code offsets `(K,)` such that `argmax(scores + offsets)` splits a large prompt sample `(N, K)` about
    evenly over the codes.

    The row argmax of a Sinkhorn plan `u_i exp(S_ik / eps) v_k` is the argmax of `S_ik + eps log v_k`: the row
    factor never changes it. So the column potentials, solved once on a sample of the training prompts, turn the
    balanced assignment of training into a fixed per-code offset, and inference stays one prompt at a time
    (deterministic and batch-invariant). A small epsilon makes the hard argmax, not only the soft plan, balanced.
    The offsets are centred (only their differences matter).
    """
    _, _, log_v = _log_potentials(scores, epsilon, iterations)
    offsets = epsilon * log_v
    return offsets - offsets.mean()
