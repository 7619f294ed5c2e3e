"""Prompt difficulty as a routing signal: the training targets compare a sample with others at its noise level, the
capacity term sends harder prompts to costlier codes under an even split, and a router with a difficulty head keeps
routing one prompt at a time, batch-invariant, through a save and a load."""

from __future__ import annotations

import math

import pytest
import torch

from router.assignment import assign
from router.difficulty import DifficultyHead, DifficultyTargets, capacity_scores
from router.model import Router, RouterConfig
from tests.router.test_model import EMBED_DIM, nested_architectures

# ------------------------------------------------------------------------------------------------------ targets


def test_targets_compare_a_sample_with_others_at_its_noise_level():
    targets = DifficultyTargets(num_train_timesteps=1000, bins=10)
    # The error's scale follows the timestep (1e-4 early, 1.0 late); half the prompts miss twice as badly.
    timesteps = torch.tensor([50, 50, 950, 950] * 4)
    factor = torch.tensor([1.0, 2.0, 1.0, 2.0] * 4)
    scale = torch.where(timesteps < 500, 1e-4, 1.0)
    for _ in range(3):  # after the first batch the averages are warm
        result = targets(scale * factor, timesteps)
    easy, hard = result[factor == 1.0], result[factor == 2.0]
    torch.testing.assert_close(easy, torch.full_like(easy, -math.log(2) / 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(hard - easy, torch.full_like(easy, math.log(2)), atol=1e-5, rtol=0)


def test_targets_follow_the_average_as_it_moves_and_survive_a_checkpoint():
    targets = DifficultyTargets(num_train_timesteps=1000, bins=4, decay=0.5)
    timesteps = torch.tensor([100, 100])
    targets(torch.tensor([1.0, 1.0]), timesteps)
    # The errors of the bin rise tenfold: the first such batch stands out, later ones much less.
    first = targets(torch.tensor([10.0, 10.0]), timesteps)
    for _ in range(20):
        later = targets(torch.tensor([10.0, 10.0]), timesteps)
    assert first.mean() > 2.0 and abs(later.mean()) < 1e-4
    restored = DifficultyTargets(num_train_timesteps=1000, bins=4, decay=0.5)
    restored.load_state_dict(targets.state_dict())
    errors = torch.tensor([3.0, 0.5])
    torch.testing.assert_close(restored(errors, timesteps), targets(errors, timesteps))


# -------------------------------------------------------------------------------------------- capacity term
def test_capacity_term_sorts_prompts_by_difficulty_under_an_even_split():
    difficulty = torch.linspace(-1.0, 1.0, 12)[torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    code_ratios = torch.tensor([0.8, 0.3, 0.55])
    codes = assign(capacity_scores(difficulty, code_ratios, weight=1.0), epsilon=0.01, iterations=50)
    order = difficulty.argsort()
    assert codes[order[:4]].tolist() == [1] * 4  # the easiest third to the cheapest code
    assert codes[order[4:8]].tolist() == [2] * 4
    assert codes[order[8:]].tolist() == [0] * 4  # the hardest to the costliest


def test_codes_of_equal_cost_get_no_capacity_term():
    term = capacity_scores(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5, 0.5]), weight=3.0)
    assert torch.equal(term, torch.zeros(2, 3, dtype=term.dtype))


# ------------------------------------------------------------------------------------------------------ router
def _difficulty_router(space, weight: float = 1.0) -> Router:
    """Two codes, the full network and a 30% one; every prompt's own architecture is the same, so only the capacity
    term and the offsets tell prompts apart. The head rates a prompt by its embedding's first coordinate."""
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=2, difficulty_weight=weight), space)
    router.codes.set_architectures(nested_architectures(space, keeps=(1.0, 0.3)))
    with torch.no_grad():
        for head in router.predictor.heads:
            head.weight.zero_()
        router.difficulty.hidden.weight.zero_()
        router.difficulty.hidden.bias.zero_()
        router.difficulty.hidden.weight[0, 0] = 1.0
        router.difficulty.out.weight[0, 0] = 1.0
    return router


def _graded_embeddings(count: int, seed: int) -> torch.Tensor:
    """Embeddings whose first coordinate (the test head's difficulty) runs over [0, 3), where GELU rises."""
    embedding = torch.randn(count, EMBED_DIM, generator=torch.Generator().manual_seed(seed))
    embedding[:, 0] = 3.0 * torch.rand(count, generator=torch.Generator().manual_seed(seed + 1))
    return embedding


def test_a_router_without_a_head_has_none_in_its_weights(small_space):
    router = Router(RouterConfig(num_codes=2), small_space)
    assert router.difficulty is None
    assert not any(name.startswith("difficulty") for name in router.state_dict())


def test_an_untrained_head_routes_as_if_it_were_absent(small_space):
    torch.manual_seed(0)
    plain = Router(RouterConfig(num_codes=4), small_space)
    plain.codes.set_architectures(nested_architectures(small_space))
    with_head = Router(RouterConfig(num_codes=4, difficulty_weight=2.0), small_space)
    with_head.load_state_dict({**plain.state_dict(), **with_head.difficulty.state_dict(prefix="difficulty.")})
    embedding = torch.randn(16, EMBED_DIM, generator=torch.Generator().manual_seed(1))
    assert torch.equal(with_head.scores(embedding), plain.scores(embedding))


def test_balanced_routing_sends_the_harder_prompts_to_the_costlier_code(small_space):
    router = _difficulty_router(small_space)
    shares = router.balance(_graded_embeddings(2000, seed=5))
    assert shares == pytest.approx([0.5, 0.5], abs=0.02)
    embedding = _graded_embeddings(400, seed=9)
    codes = router.route_embeddings(embedding).codes
    rating = embedding[:, 0]
    assert rating[codes == 0].min() > rating[codes == 1].max()  # code 0 is the full network


def test_routing_with_a_head_is_batch_invariant_and_survives_a_save(small_space, tmp_path):
    router = _difficulty_router(small_space, weight=0.7)
    router.balance(_graded_embeddings(1000, seed=5))
    embedding = _graded_embeddings(32, seed=9)
    routing = router.route_embeddings(embedding)
    assert set(routing.codes.tolist()) == {0, 1}
    for row in range(len(embedding)):
        alone = router.route_embeddings(embedding[row : row + 1])
        assert torch.equal(alone.all_scores[0], routing.all_scores[row])
    loaded = Router.load(router.save(tmp_path / "router"))
    assert loaded.config.difficulty_weight == 0.7
    again = loaded.route_embeddings(embedding)
    assert torch.equal(again.all_scores, routing.all_scores) and torch.equal(again.codes, routing.codes)


def test_head_computes_in_the_embeddings_dtype():
    head = DifficultyHead(8)
    torch.nn.init.normal_(head.out.weight)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert head(x).dtype == torch.float64 and head(x).shape == (3,)
    torch.testing.assert_close(head(x).float(), head(x.float()), atol=1e-5, rtol=1e-5)
