"""Metrics on the embedded domain: domain FID and CMMD on the evaluator's features, per-tier means, and paired
differences between two models scored on the same prompts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .evaluator import DomainEvaluator


class EvaluatorFeatures(nn.Module):
    """The evaluator's penultimate features as a torchmetrics feature extractor (uint8 images in)."""

    def __init__(self, evaluator: DomainEvaluator):
        super().__init__()
        self.evaluator = evaluator
        self.num_features = evaluator.config.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.features(images.float() / 127.5 - 1.0).double()


def domain_fid(evaluator: DomainEvaluator, reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """torchmetrics' FID computed on the evaluator's features ("domain FID", not Inception FID)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=EvaluatorFeatures(evaluator), reset_real_features=True)
    for start in range(0, len(reference), 256):
        fid.update(reference[start : start + 256], real=True)
    for start in range(0, len(candidate), 256):
        fid.update(candidate[start : start + 256], real=False)
    return float(fid.compute())


@torch.no_grad()
def evaluator_features(evaluator: DomainEvaluator, images: torch.Tensor) -> torch.Tensor:
    extractor = EvaluatorFeatures(evaluator)
    return torch.cat([extractor(images[s : s + 256]) for s in range(0, len(images), 256)])


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Unbiased squared MMD with a Gaussian RBF kernel (the CMMD estimator, here on evaluator features), x1000."""
    gamma = 1.0 / (2 * sigma**2)

    def mean_kernel(a, b, same: bool) -> torch.Tensor:
        k = torch.exp(-gamma * torch.cdist(a, b).pow(2))
        if same:
            n = len(a)
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    return float(1000 * (mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False)))


def median_bandwidth(features: torch.Tensor) -> float:
    distances = torch.cdist(features, features)
    return float(distances[~torch.eye(len(features), dtype=torch.bool)].median())


def mean_by_tier(values: np.ndarray, tiers: np.ndarray) -> dict[str, float]:
    """Mean of `values` overall and per difficulty tier (`tiers`: one per value)."""
    result = {"overall": float(values.mean())}
    result.update({f"tier{t}": float(values[tiers == t].mean()) for t in sorted(set(tiers.tolist()))})
    return result


def paired_difference(
    values: Sequence[float], reference: Sequence[float], resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Mean of `values - reference`, two models' scores on the same prompts with the same seeds, and its 95%
    bootstrap interval over prompts (resampling prompts keeps each prompt's pair together)."""
    diff = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    low, high = np.quantile(diff[picks].mean(axis=1), [0.025, 0.975])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high)}


def format_paired(difference: dict[str, float]) -> str:
    """A `paired_difference` as one table cell: `+0.004 [-0.002, +0.010]`."""
    return f"{difference['mean']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"
