"""The router's training losses: contrastive (architecture similarity follows prompt similarity), the prunable
budget, resource and spread terms."""

from __future__ import annotations

import math

import pytest
import torch

from router.losses import contrastive_loss, prunable_budget, resource_loss, spread_losses


def _clustered_text(clusters: int = 3, per_cluster: int = 4, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Prompt embeddings in tight clusters: high similarity inside a cluster, low across."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    noise = 0.15 * torch.randn(clusters, per_cluster, dim, generator=generator)
    return (centres[:, None, :] + noise).reshape(clusters * per_cluster, dim)


def _mirroring_arch(text: torch.Tensor, dim: int = 48, seed: int = 1) -> torch.Tensor:
    """Architecture vectors with exactly the prompts' cosine similarities (an isometry of the text space)."""
    q, _ = torch.linalg.qr(torch.randn(dim, text.shape[1], generator=torch.Generator().manual_seed(seed)))
    return text @ q.T  # (B, dim), q has orthonormal columns


def test_contrastive_loss_is_lower_when_architectures_mirror_prompts():
    text = _clustered_text()
    arch = _mirroring_arch(text)
    shuffled = arch[torch.tensor([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])]  # every cluster mixed with the others
    aligned_loss = contrastive_loss(arch, text)
    shuffled_loss = contrastive_loss(shuffled, text)
    assert aligned_loss.ndim == 0
    assert aligned_loss < shuffled_loss - 0.01
    # Independent random architectures are worse than mirroring ones too.
    random_arch = torch.randn(arch.shape, generator=torch.Generator().manual_seed(5))
    assert aligned_loss < contrastive_loss(random_arch, text)


def test_contrastive_loss_is_minimal_at_the_mirror():
    """Moving the architecture vectors away from the mirror, in any random direction, raises the loss."""
    text = _clustered_text()
    arch = _mirroring_arch(text)
    base = contrastive_loss(arch, text)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        assert contrastive_loss(arch + 0.3 * torch.randn(arch.shape, generator=generator), text) > base


def test_contrastive_loss_ignores_vector_scale():
    text = _clustered_text()
    arch = _mirroring_arch(text)
    scales = torch.linspace(0.5, 3.0, len(arch))[:, None]
    torch.testing.assert_close(contrastive_loss(arch * scales, text * 2), contrastive_loss(arch, text))


def test_contrastive_loss_trains_the_architectures_only():
    text = _clustered_text().requires_grad_()
    arch = _mirroring_arch(text.detach())[torch.randperm(12, generator=torch.Generator().manual_seed(3))]
    arch.requires_grad_()
    loss = contrastive_loss(arch, text)
    loss.backward()
    assert arch.grad is not None and torch.isfinite(arch.grad).all() and arch.grad.abs().sum() > 0
    assert text.grad is None  # the prompt side is the fixed target


def test_contrastive_gradient_step_lowers_the_loss():
    text = _clustered_text()
    arch = _mirroring_arch(text)[torch.randperm(12, generator=torch.Generator().manual_seed(4))]
    arch.requires_grad_()
    before = contrastive_loss(arch, text)
    before.backward()
    with torch.no_grad():
        after = contrastive_loss(arch - 0.5 * arch.grad / arch.grad.norm(), text)
    assert after < before


def test_contrastive_loss_pulls_together_similar_prompts_with_dissimilar_architectures():
    text = _clustered_text(clusters=2, per_cluster=3)  # two groups of near-identical prompts
    arch = torch.eye(6, 16, requires_grad=True)  # six mutually orthogonal architectures
    loss = contrastive_loss(arch, text)
    assert loss > contrastive_loss(_mirroring_arch(text), text)  # the loss sees the mismatch ...
    loss.backward()
    assert arch.grad.abs().sum() > 0  # ... and must give a gradient that fixes it


# ----------------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize(
    ("p", "total", "prunable", "expected"),
    [(0.5, 100.0, 80.0, 0.375), (0.7, 1000.0, 900.0, 1 - 0.3 * 1000 / 900), (1.0, 10.0, 4.0, 1.0)],
)
def test_prunable_budget_formula(p, total, prunable, expected):
    assert prunable_budget(p, total, prunable) == pytest.approx(expected)


def test_prunable_budget_keeps_the_total_at_p():
    """Pruning the prunable part to p' leaves exactly p of the total: fixed + p' * prunable = p * total."""
    total, prunable, p = 126_228_480, 107_939_840, 0.6
    target = prunable_budget(p, total, prunable)
    assert (total - prunable) + target * prunable == pytest.approx(p * total)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.0])
def test_unreachable_budget_raises_naming_it(p):
    # The unprunable 20% alone exceed (or equal) the budget.
    with pytest.raises(ValueError, match=f"p={p}"):
        prunable_budget(p, 100.0, 80.0)


# ------------------------------------------------------------------------------------------ resource and spread
def test_resource_loss_is_zero_on_target():
    ratios = torch.tensor([0.2, 0.4, 0.6, 0.8])  # mean 0.5
    assert resource_loss(ratios, 0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_resource_loss_is_symmetric_in_log():
    target = 0.4
    over = resource_loss(torch.tensor([0.8, 0.8]), target)  # mean = 2 * target
    under = resource_loss(torch.tensor([0.1, 0.3]), target)  # mean = target / 2
    assert over.item() == pytest.approx(math.log(2))
    assert under.item() == pytest.approx(math.log(2))


def test_resource_loss_pushes_the_mean_ratio_to_the_target():
    ratios = torch.tensor([0.9, 0.7, 0.8], requires_grad=True)
    resource_loss(ratios, 0.5).backward()
    assert (ratios.grad > 0).all()  # too expensive: every ratio is pushed down
    ratios.grad = None
    resource_loss(ratios, 0.95).backward()
    assert (ratios.grad < 0).all()


def test_spread_losses_on_a_known_vector():
    ratios = torch.tensor([0.2, 0.4, 0.6, 0.8])
    negative_std, headroom = spread_losses(ratios)
    assert negative_std.item() == pytest.approx(-math.sqrt(0.05))  # population std
    assert headroom.item() == pytest.approx(0.2)


def test_spread_losses_on_a_single_prompt():
    negative_std, headroom = spread_losses(torch.tensor([0.7]))
    assert negative_std.item() == 0.0
    assert headroom.item() == pytest.approx(0.3)


def test_spread_losses_reward_spread_and_one_large_code():
    ratios = torch.tensor([0.3, 0.5, 0.6], requires_grad=True)
    negative_std, headroom = spread_losses(ratios)
    (negative_std + headroom).backward()
    assert ratios.grad[0] > 0  # the smallest is pushed further down
    assert ratios.grad[2] < 0  # the largest is pushed up
