"""The router's training losses (docs/method.md, phase 1): contrastive, resource, and spread terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(arch: torch.Tensor, text: torch.Tensor, tau: float = 0.03) -> torch.Tensor:
    """Make architecture similarity follow prompt similarity: BCE between the row-softmaxed similarity matrices
    of the normalised architecture vectors `arch` (B, D_a) and prompt embeddings `text` (B, D_t), averaged over
    the B x B entries. The prompt side is the (fixed) target."""
    a = F.normalize(arch, dim=-1)
    z = F.normalize(text, dim=-1)
    log_p = (a @ a.T / tau).log_softmax(dim=-1)  # (B, B)
    log_not_p = torch.log((-torch.expm1(log_p)).clamp_min(1e-12))  # log(1 - p), without clamping p itself
    p_text = (z @ z.T / tau).softmax(dim=-1).detach()  # (B, B)
    return -(p_text * log_p + (1 - p_text) * log_not_p).mean()


def prunable_budget(p: float, total_macs: float, prunable_macs: float) -> float:
    """The budget on prunable MACs, p' = 1 - (1 - p) * total / prunable, for a budget p on total MACs."""
    target = 1 - (1 - p) * total_macs / prunable_macs
    if not 0 < target <= 1:
        raise ValueError(
            f"budget p={p} is not reachable: the unprunable part alone is {1 - prunable_macs / total_macs:.2f}"
        )
    return target


def resource_loss(ratios: torch.Tensor, target: float) -> torch.Tensor:
    """|log(mean_b R_b / p')| for prunable-MAC ratios R_b `(B,)`."""
    return torch.abs(torch.log(ratios.mean() / target))


def code_resource_loss(code_ratios: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_k |log(R_k / p'_k)|: each code's prunable-MAC ratio `(K,)` held to its own target `(K,)`."""
    return torch.abs(torch.log(code_ratios / targets)).mean()


def spread_losses(ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(-std_b R_b, 1 - max_b R_b): keep the routed costs apart and let one code stay large."""
    std = ratios.std(unbiased=False) if ratios.numel() > 1 else ratios.new_zeros(())
    return -std, 1 - ratios.max()
