"""Optimal-transport assignment of prompts to codes: the torch Sinkhorn against POT, and the no-collapse
property that keeps every code in use."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch

from router.assignment import assign, balancing_offsets, sinkhorn


def _scores(batch: int, codes: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Cosine-like scores in [-1, 1]."""
    return torch.rand(batch, codes, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def _pot_plan(scores: torch.Tensor, epsilon: float, iterations: int) -> np.ndarray:
    batch, codes = scores.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sinkhorn did not converge": a fixed, small number of iterations
        return ot.sinkhorn(
            np.ones(batch) / batch,
            np.ones(codes) / codes,
            -scores.double().numpy(),
            epsilon,
            numItermax=iterations,
            stopThr=0,
        )


@pytest.mark.parametrize(
    ("batch", "codes", "iterations"), [(8, 4, 1), (8, 4, 3), (16, 5, 3), (7, 3, 10), (64, 8, 3), (32, 8, 50)]
)
def test_sinkhorn_matches_pot(batch, codes, iterations):
    scores = _scores(batch, codes, seed=batch * codes + iterations)
    plan = sinkhorn(scores, 0.05, iterations)
    assert plan.shape == (batch, codes)
    np.testing.assert_allclose(plan.numpy(), _pot_plan(scores, 0.05, iterations), rtol=1e-6, atol=0)


def test_sinkhorn_matches_pot_at_another_epsilon_and_in_float32():
    scores = _scores(12, 4, seed=3, dtype=torch.float32)
    plan = sinkhorn(scores, 0.2, 5)
    assert plan.dtype == torch.float32
    np.testing.assert_allclose(plan.numpy(), _pot_plan(scores, 0.2, 5), rtol=1e-5, atol=0)


def test_defaults_are_the_papers_settings():
    scores = _scores(16, 4, seed=5)
    torch.testing.assert_close(sinkhorn(scores), sinkhorn(scores, 0.05, 3))
    np.testing.assert_allclose(sinkhorn(scores).numpy(), _pot_plan(scores, 0.05, 3), rtol=1e-6, atol=0)


def test_plan_has_uniform_marginals():
    batch, codes = 24, 4
    scores = _scores(batch, codes, seed=1)
    few = sinkhorn(scores, 0.05, 3)
    # The last update is the row update: rows sum to 1/B after any number of iterations.
    np.testing.assert_allclose(few.sum(1).numpy(), np.full(batch, 1 / batch), rtol=1e-6)
    # Columns reach 1/K once the iterations converge.
    converged = sinkhorn(scores, 0.05, 2000)
    np.testing.assert_allclose(converged.sum(0).numpy(), np.full(codes, 1 / codes), rtol=1e-4)
    np.testing.assert_allclose(converged.sum(1).numpy(), np.full(batch, 1 / batch), rtol=1e-6)
    assert (converged >= 0).all()


def test_sinkhorn_is_stable_at_small_epsilon():
    """Scores / epsilon up to 1000: the log domain keeps the plan finite where a plain kernel exp() overflows."""
    scores = _scores(16, 4, seed=2) * 10
    plan = sinkhorn(scores, 0.01, 3)
    assert torch.isfinite(plan).all()
    np.testing.assert_allclose(plan.sum(1).numpy(), np.full(16, 1 / 16), rtol=1e-6)


def _collapsing_scores(batch: int = 16, codes: int = 4, seed: int = 0) -> torch.Tensor:
    """Every prompt is most similar to code 0; the other codes get varied, lower scores."""
    scores = torch.rand(batch, codes, generator=torch.Generator().manual_seed(seed)) * 0.5
    scores[:, 0] = 0.9
    return scores


@pytest.mark.parametrize(("batch", "codes", "seed"), [(16, 4, 0), (8, 4, 1), (32, 8, 2), (12, 3, 3)])
def test_assignment_keeps_every_code_in_use_where_argmax_collapses(batch, codes, seed):
    scores = _collapsing_scores(batch, codes, seed)
    assert scores.argmax(1).unique().tolist() == [0]  # the collapse that plain argmax routing suffers
    chosen = assign(scores)
    assert chosen.shape == (batch,)
    assert chosen.dtype == torch.long
    counts = torch.bincount(chosen, minlength=codes)
    assert (counts > 0).all(), counts.tolist()
    assert counts.max() <= batch // 2, counts.tolist()


def test_assignment_follows_the_secondary_preferences():
    """Of the prompts sent away from the crowded code 0, each goes to its own second-best code."""
    scores = _collapsing_scores(16, 4, seed=0)
    chosen = assign(scores)
    moved = chosen != 0
    assert moved.any()
    second = scores[:, 1:].argmax(1) + 1
    assert torch.equal(chosen[moved], second[moved])


def test_assignment_recovers_a_one_to_one_matching():
    permutation = torch.tensor([2, 0, 3, 1])
    scores = torch.full((4, 4), 0.1)
    scores[torch.arange(4), permutation] = 0.8
    assert torch.equal(assign(scores), permutation)


def test_assignment_is_the_argmax_of_the_plan_rows():
    scores = _scores(20, 5, seed=4, dtype=torch.float32)
    assert torch.equal(assign(scores), sinkhorn(scores).argmax(1))
    assert torch.equal(assign(scores, 0.1, 7), sinkhorn(scores, 0.1, 7).argmax(1))


def test_no_gradient_flows_through_the_assignment():
    scores = _scores(8, 4, seed=6, dtype=torch.float32).requires_grad_()
    plan = sinkhorn(scores)
    assert not plan.requires_grad
    assert not assign(scores).requires_grad
    assert scores.grad is None


# ------------------------------------------------------------------------------------ offsets for inference
def _crowded_scores(count: int = 4000, codes: int = 4, seed: int = 0) -> torch.Tensor:
    """Scores like a trained router's at inference: one code is the best match of most prompts."""
    generator = torch.Generator().manual_seed(seed)
    scores = 0.6 + 0.05 * torch.randn(count, codes, generator=generator, dtype=torch.float64)
    scores[:, 2] += 0.06
    return scores


def test_offsets_balance_the_plain_argmax():
    scores = _crowded_scores()
    crowded = torch.bincount(scores.argmax(1), minlength=4) / len(scores)
    assert crowded[2] > 0.5  # the problem: one code takes most prompts
    offsets = balancing_offsets(scores)
    assert offsets.shape == (4,)
    assert abs(offsets.sum().item()) < 1e-9  # centred: only differences matter
    assert offsets[2] == offsets.min()  # the crowded code is pushed down
    shares = torch.bincount((scores + offsets).argmax(1), minlength=4) / len(scores)
    np.testing.assert_allclose(shares.numpy(), np.full(4, 0.25), atol=0.02)


def test_offsets_are_the_transport_plans_code_potentials():
    """argmax of the converged Sinkhorn plan's rows == argmax of scores + offsets, prompt by prompt."""
    scores = _crowded_scores(500, 5, seed=1)
    epsilon, iterations = 0.01, 2000
    plan = sinkhorn(scores, epsilon, iterations)
    offsets = balancing_offsets(scores, epsilon, iterations)
    assert torch.equal((scores + offsets).argmax(1), plan.argmax(1))


def test_offsets_leave_a_balanced_routing_alone():
    scores = _scores(2000, 4, seed=6)  # uniform scores: argmax already splits evenly
    offsets = balancing_offsets(scores)
    assert offsets.abs().max() < 0.05  # small against scores spread over [-1, 1]
    agree = ((scores + offsets).argmax(1) == scores.argmax(1)).double().mean()
    assert agree > 0.97
