"""The architecture predictor, the codes, and the inference `Router`: layout, code architectures, deterministic
batch-invariant routing, MACs, and checked save/load."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pruning import ArchitectureSpace
from router.gates import depth_order, nested_depth_logits
from router.model import ROUTER_CONFIG, ROUTER_WEIGHTS, ArchitectureCodes, ArchitecturePredictor, Router, RouterConfig

EMBED_DIM = 384
KEEPS = (1.0, 0.7, 0.5, 0.3)
PROMPTS = [
    "a small red circle above a blue square",
    "two green triangles",
    "a yellow star on the left",
    "a purple square below a red circle",
    "an orange circle",
    "three blue stars in a row",
    "a large green square",
    "a red triangle next to a yellow circle",
]


def nested_architectures(space: ArchitectureSpace, keeps=KEEPS, seed: int = 0) -> torch.Tensor:
    """Random hard architectures keeping a fraction `keeps[k]` of the gates, with nested depth parts (a prefix of
    the depth order of length round(keep * n), at least 1)."""
    order = depth_order(space)
    archs = []
    for code, keep in enumerate(keeps):
        arch = space.random(keep, seed=seed + code)
        depth = torch.zeros(len(order))
        depth[order[: max(1, round(keep * len(order)))]] = 1.0
        arch[space.width_dim :] = depth
        archs.append(arch)
    return torch.stack(archs)


def _embeddings(count: int, seed: int) -> torch.Tensor:
    return 2.0 * torch.randn(count, EMBED_DIM, generator=torch.Generator().manual_seed(seed))


def _spread_router(space: ArchitectureSpace, width_bias: float = -2.0, seed: int = 0) -> tuple[Router, torch.Tensor]:
    """A router whose predictor gives each prompt its own architecture (~70% of gates on), with the codes set to
    the architectures of 4 anchor embeddings, so routing is spread over the codes. Returns (router, anchors)."""
    torch.manual_seed(seed)
    router = Router(RouterConfig(num_codes=4), space)
    with torch.no_grad():
        for head in router.predictor.heads:
            head.bias.fill_(width_bias)
    anchors = _embeddings(4, seed=100 + seed)
    router.codes.set_architectures(_prompt_architectures(router, anchors))
    return router, anchors


def _prompt_architectures(router: Router, embedding: torch.Tensor) -> torch.Tensor:
    _, hard = router.gates(router.predictor(embedding).detach(), noise=False)
    return router.space.harden(hard)


def _assert_same_routing(actual, expected) -> None:
    assert torch.equal(actual.codes, expected.codes)
    assert torch.equal(actual.scores, expected.scores)
    assert torch.equal(actual.all_scores, expected.all_scores)


@pytest.fixture(scope="module")
def spread(small_space):
    return _spread_router(small_space)


# --------------------------------------------------------------------------------------------- predictor, codes
def test_predictor_output_layout_and_init(small_space):
    torch.manual_seed(0)
    predictor = ArchitecturePredictor(small_space, EMBED_DIM)
    embedding = _embeddings(5, seed=1)
    out = predictor(embedding)
    assert out.shape == (5, small_space.dim)
    linears = [*predictor.heads, predictor.depth]
    assert len(predictor.heads) == len(small_space.width_units)
    for linear in linears:
        weight = linear.weight.detach()
        torch.testing.assert_close(weight @ weight.T, torch.eye(weight.shape[0]), atol=1e-5, rtol=0)  # orthogonal
        assert torch.equal(linear.bias.detach(), torch.zeros_like(linear.bias))
    # Width logits per unit, in the architecture vector's layout; depth logits through the nested ordering.
    for head, unit in zip(predictor.heads, small_space.width_units, strict=True):
        torch.testing.assert_close(out[:, small_space.slices[unit.name]], head(embedding))
    depth = nested_depth_logits(predictor.depth(embedding), depth_order(small_space))
    torch.testing.assert_close(out[:, small_space.width_dim :], depth)


def test_codes_shape_and_orthogonal_init(small_space):
    torch.manual_seed(0)
    codes = ArchitectureCodes(small_space, 4)
    assert codes().shape == (4, small_space.dim)
    weight = codes.embedding.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(4), atol=1e-5, rtol=0)


def test_fresh_router_starts_from_the_full_network(small_space):
    """Zero bias and offset 3: a fresh predictor keeps (almost) every width gate for an ordinary embedding."""
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=4), small_space)
    archs = _prompt_architectures(router, torch.randn(8, EMBED_DIM) * 0.1)
    assert archs[:, : small_space.width_dim].mean() > 0.99


# ----------------------------------------------------------------------------------------- code architectures
def test_set_architectures_round_trip(small_space):
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=4), small_space)
    archs = nested_architectures(small_space)
    router.codes.set_architectures(archs)
    assert torch.equal(router.code_architectures(), archs)
    assert router.code_architectures().shape == (4, small_space.dim)


def test_set_architectures_with_another_offset_and_temperature(small_space):
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=3, temperature=1.0, offset=-1.0), small_space)
    archs = nested_architectures(small_space, keeps=(0.9, 0.6, 0.2), seed=5)
    router.codes.set_architectures(archs, offset=router.config.offset)
    assert torch.equal(router.code_architectures(), archs)


def _with_depth(space: ArchitectureSpace, kept_positions: list[int]) -> torch.Tensor:
    order = depth_order(space)
    arch = space.full()
    arch[space.width_dim :] = 0.0
    for position in kept_positions:
        arch[space.width_dim + order[position]] = 1.0
    return arch


@pytest.mark.parametrize(
    "kept_positions", [[1, 2], [0, 2], [0, 1, 3], []], ids=["first-dropped", "gap", "late-gap", "none-kept"]
)
def test_non_nested_depth_pattern_is_rejected(small_space, kept_positions):
    codes = ArchitectureCodes(small_space, 2)
    before = codes.embedding.weight.detach().clone()
    archs = torch.stack([_with_depth(small_space, [0, 1]), _with_depth(small_space, kept_positions)])
    with pytest.raises(ValueError, match="code 1"):
        codes.set_architectures(archs)
    assert torch.equal(codes.embedding.weight.detach(), before)  # nothing half-written


def test_set_architectures_rejects_a_wrong_shape(small_space):
    codes = ArchitectureCodes(small_space, 2)
    with pytest.raises(ValueError, match="dim"):
        codes.set_architectures(torch.ones(2, small_space.dim + 1))


def test_code_macs_are_the_spaces_macs(small_space):
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=4), small_space)
    archs = nested_architectures(small_space)
    router.codes.set_architectures(archs)
    assert router.resolution == small_space.default_resolution
    macs = router.code_macs()
    assert macs == [small_space.macs(arch, router.resolution) for arch in archs]
    assert macs[0] == small_space.total_macs(router.resolution)  # keep 1.0 with every depth unit: the full U-Net
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4


def test_code_macs_follow_the_serving_resolution(small_space):
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=4), small_space, resolution=32)
    router.codes.set_architectures(nested_architectures(small_space))
    assert router.code_macs() == [small_space.macs(a, 32) for a in router.code_architectures()]
    assert router.code_macs()[0] == small_space.total_macs(32)


# ---------------------------------------------------------------------------------------------------- routing
def test_a_prompt_with_a_codes_architecture_routes_to_it(spread):
    router, anchors = spread
    routing = router.route_embeddings(anchors)
    assert routing.codes.tolist() == [0, 1, 2, 3]
    assert routing.scores.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_routing_result_is_consistent(spread):
    router, _ = spread
    routing = router.route_embeddings(_embeddings(16, seed=7))
    assert routing.codes.shape == (16,) and routing.all_scores.shape == (16, 4)
    assert torch.equal(routing.codes, routing.all_scores.argmax(1))
    assert torch.equal(routing.scores, routing.all_scores.max(1).values)
    assert ((routing.all_scores >= 0) & (routing.all_scores <= 1)).all()  # cosines of non-negative vectors


def test_routing_is_deterministic_and_batch_invariant(spread):
    router, _ = spread
    embedding = _embeddings(16, seed=7)
    routing = router.route_embeddings(embedding)
    assert len(set(routing.codes.tolist())) >= 3  # the routing is spread: the test compares real decisions
    _assert_same_routing(router.route_embeddings(embedding), routing)
    for row in range(16):
        alone = router.route_embeddings(embedding[row : row + 1])
        assert alone.codes.item() == routing.codes[row].item()
        assert alone.scores.item() == routing.scores[row].item()
        assert torch.equal(alone.all_scores[0], routing.all_scores[row])
    reverse = router.route_embeddings(embedding.flip(0))
    assert torch.equal(reverse.codes.flip(0), routing.codes)
    assert torch.equal(reverse.all_scores.flip(0), routing.all_scores)
    # Inside a different, larger batch too.
    mixed = torch.cat([_embeddings(5, seed=8), embedding, _embeddings(3, seed=9)])
    assert torch.equal(router.route_embeddings(mixed).all_scores[5:21], routing.all_scores)


def test_routing_ignores_the_global_random_state(spread):
    router, _ = spread
    embedding = _embeddings(8, seed=11)
    torch.manual_seed(1)
    first = router.route_embeddings(embedding)
    torch.manual_seed(2)
    _assert_same_routing(router.route_embeddings(embedding), first)


def test_routing_with_nested_keep_codes_is_batch_invariant(small_space):
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=4), small_space)
    router.codes.set_architectures(nested_architectures(small_space))
    embedding = _embeddings(16, seed=3)
    routing = router.route_embeddings(embedding)
    for row in range(16):
        assert torch.equal(router.route_embeddings(embedding[row : row + 1]).all_scores[0], routing.all_scores[row])


def test_ties_break_to_the_lowest_code_index(spread, small_space):
    router, anchors = spread
    a, b = router.code_architectures()[:2]
    tied = Router(RouterConfig(num_codes=4), small_space)
    tied.predictor.load_state_dict(router.predictor.state_dict())
    tied.codes.set_architectures(torch.stack([a, b, b, a]))  # codes 0 = 3 and 1 = 2
    embedding = torch.cat([anchors, _embeddings(16, seed=7)])
    routing = tied.route_embeddings(embedding)
    assert torch.equal(routing.all_scores[:, 0], routing.all_scores[:, 3])
    assert torch.equal(routing.all_scores[:, 1], routing.all_scores[:, 2])
    assert routing.codes[:2].tolist() == [0, 1]  # anchors of a and b
    assert set(routing.codes.tolist()) == {0, 1}
    for row in range(len(embedding)):  # alone, and in reverse order, the same choice
        assert tied.route_embeddings(embedding[row : row + 1]).codes.item() == routing.codes[row].item()
    assert torch.equal(tied.route_embeddings(embedding.flip(0)).codes.flip(0), routing.codes)


def test_identical_codes_all_route_to_code_zero(small_space):
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=3), small_space)
    arch = nested_architectures(small_space, keeps=(0.6,))[0]
    router.codes.set_architectures(torch.stack([arch, arch, arch]))
    routing = router.route_embeddings(_embeddings(10, seed=4))
    assert routing.codes.tolist() == [0] * 10


def test_balance_spreads_a_crowded_router_and_keeps_routing_batch_invariant(small_space):
    router, _ = _spread_router(small_space, seed=3)
    with torch.no_grad():  # shift every prompt's gates towards code 0's architecture: it takes most prompts
        router.predictor.heads[0].bias.add_(4.0)
    sample = _embeddings(800, seed=21)
    assert torch.equal(router.code_offsets, torch.zeros(4))
    crowded = torch.bincount(router.route_embeddings(sample).codes, minlength=4) / len(sample)
    shares = router.balance(sample)
    assert max(shares) < crowded.max().item()
    np.testing.assert_allclose(shares, np.full(4, 0.25), atol=0.05)
    embedding = _embeddings(16, seed=7)
    routing = router.route_embeddings(embedding)
    for row in range(16):  # the offsets are fixed numbers: a prompt's code still depends on it alone
        assert router.route_embeddings(embedding[row : row + 1]).codes.item() == routing.codes[row].item()
    # Offsets change the decision, not the reported similarity to every code.
    scores = router.scores(embedding)
    assert torch.equal(routing.all_scores, scores)
    assert torch.equal(routing.codes, (scores + router.code_offsets.double()).argmax(1))


def test_balance_offsets_survive_save_and_load(small_space, tmp_path):
    router, _ = _spread_router(small_space, seed=3)
    router.balance(_embeddings(400, seed=22))
    assert router.code_offsets.abs().sum() > 0
    loaded = Router.load(router.save(tmp_path / "router"))
    assert torch.equal(loaded.code_offsets, router.code_offsets)
    embedding = _embeddings(32, seed=23)
    _assert_same_routing(loaded.route_embeddings(embedding), router.route_embeddings(embedding))


# ------------------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip(spread, tmp_path):
    router, anchors = spread
    folder = router.save(tmp_path / "router")
    assert sorted(p.name for p in folder.iterdir()) == sorted([ROUTER_CONFIG, ROUTER_WEIGHTS])
    loaded = Router.load(folder)
    assert loaded.config == router.config
    assert loaded.resolution == router.resolution
    assert loaded.space.to_dict() == router.space.to_dict()
    assert not loaded.training
    for name, tensor in router.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.code_architectures(), router.code_architectures())
    assert loaded.code_macs() == router.code_macs()
    embedding = torch.cat([anchors, _embeddings(12, seed=7)])
    _assert_same_routing(loaded.route_embeddings(embedding), router.route_embeddings(embedding))


@pytest.fixture
def saved(spread, tmp_path):
    return spread[0].save(tmp_path / "router")


@pytest.mark.parametrize("content", [b"not a safetensors file", b""], ids=["garbage", "empty"])
def test_corrupt_weights_raise_naming_the_file(saved, content):
    weights = saved / ROUTER_WEIGHTS
    weights.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        Router.load(saved)


def test_truncated_weights_raise_naming_the_file(saved):
    weights = saved / ROUTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        Router.load(saved)


def test_checksum_mismatch_raises_naming_the_file(saved):
    with pytest.raises(ValueError, match=re.escape(str(saved / ROUTER_WEIGHTS)) + ".*checksum"):
        Router.load(saved, sha256="0" * 64)


def test_missing_weights_raise_naming_the_file(saved):
    (saved / ROUTER_WEIGHTS).unlink()
    with pytest.raises(ValueError, match=re.escape(str(saved / ROUTER_WEIGHTS))):
        Router.load(saved)


def test_weights_of_another_router_raise_naming_the_file(saved):
    config = saved / ROUTER_CONFIG
    description = json.loads(config.read_text())
    description["router"]["num_codes"] = 3  # the weights hold 4 codes
    config.write_text(json.dumps(description))
    with pytest.raises(ValueError, match=re.escape(str(saved / ROUTER_WEIGHTS))):
        Router.load(saved)


@pytest.mark.parametrize("damage", ["invalid-json", "no-space", "bad-num-codes"])
def test_bad_config_raises_naming_it(saved, damage):
    config = saved / ROUTER_CONFIG
    description = json.loads(config.read_text())
    if damage == "invalid-json":
        config.write_text("{not json")
    elif damage == "no-space":
        del description["space"]
        config.write_text(json.dumps(description))
    else:
        description["router"]["num_codes"] = 0
        config.write_text(json.dumps(description))
    with pytest.raises(ValueError, match=re.escape(str(config))):
        Router.load(saved)


# ---------------------------------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def prompt_router(small_space, prompt_encoder):
    """A router over the real prompt encoder whose codes are the architectures of four of `PROMPTS`."""
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=4, encoder=prompt_encoder.config), small_space, encoder=prompt_encoder)
    with torch.no_grad():
        for head in router.predictor.heads:
            head.bias.fill_(-2.8)  # near-centred width logits: each prompt gets its own architecture
    pooled = prompt_encoder.encode(PROMPTS[:4]).pooled
    router.codes.set_architectures(_prompt_architectures(router, pooled))
    return router


def test_route_prompts_returns_one_code_per_prompt(prompt_router):
    routing = prompt_router.route(PROMPTS)
    assert routing.codes.shape == (len(PROMPTS),)
    assert routing.codes[:4].tolist() == [0, 1, 2, 3]  # the prompts the codes were made from
    assert routing.scores[:4].tolist() == [1.0] * 4
    assert ((routing.codes >= 0) & (routing.codes < 4)).all()


def test_a_prompts_code_does_not_depend_on_its_batch(prompt_router):
    routing = prompt_router.route(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = prompt_router.route([prompt])
        assert alone.codes.item() == routing.codes[i].item(), prompt
        assert alone.scores.item() == routing.scores[i].item(), prompt
    reverse = prompt_router.route(PROMPTS[::-1])
    assert reverse.codes.flip(0).tolist() == routing.codes.tolist()
    repeated = prompt_router.route([PROMPTS[5], *PROMPTS[:3], PROMPTS[5]])
    assert repeated.codes[0].item() == repeated.codes[-1].item() == routing.codes[5].item()


def test_loaded_router_routes_prompts_the_same(prompt_router, prompt_encoder, tmp_path):
    loaded = Router.load(prompt_router.save(tmp_path / "router"), encoder=prompt_encoder)
    _assert_same_routing(loaded.route(PROMPTS), prompt_router.route(PROMPTS))


def test_prompt_routing_is_spread(prompt_router):
    assert len(set(prompt_router.route(PROMPTS).codes.tolist())) >= 3


def test_width_only_routers_hold_every_block(small_space):
    archs = nested_architectures(small_space)
    assert (archs[:, small_space.width_dim :] == 0).any()  # the codes' own depth parts drop blocks
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=4, prune_depth=False), small_space)
    router.codes.set_architectures(archs)
    held = router.code_architectures()
    assert (held[:, small_space.width_dim :] == 1).all()
    assert torch.equal(held[:, : small_space.width_dim], archs[:, : small_space.width_dim])
    logits = router.predictor(_embeddings(6, seed=1))
    soft, hard = router.gates(logits, noise=True, generator=torch.Generator().manual_seed(0))
    assert (hard[:, small_space.width_dim :] == 1).all() and (soft[:, small_space.width_dim :] == 1).all()
    soft.sum().backward()
    assert router.predictor.depth.weight.grad is None or (router.predictor.depth.weight.grad == 0).all()
    assert router.predictor.heads[0].weight.grad.abs().sum() > 0


def test_held_open_gates_are_kept_for_every_prompt_and_code_and_survive_a_save(small_space, tmp_path):
    held = [0, 1, small_space.width_dim - 1]
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=3, held_open=held), small_space)
    router.codes.set_architectures(nested_architectures(small_space, keeps=(0.8, 0.5, 0.3)))
    logits = router.predictor(_embeddings(5, seed=2))
    soft, hard = router.gates(logits, noise=True, generator=torch.Generator().manual_seed(1))
    assert (soft[:, held] == 1).all() and (hard[:, held] == 1).all()
    soft.sum().backward()
    head = router.predictor.heads[0]  # its first two gates are held: no gradient reaches their rows
    assert (head.weight.grad[:2] == 0).all() and head.weight.grad[2:].abs().sum() > 0
    assert (router.code_architectures()[:, held] == 1).all()
    loaded = Router.load(router.save(tmp_path / "router"))
    assert loaded.config.held_open == held
    assert torch.equal(loaded.code_architectures(), router.code_architectures())


def test_held_open_gates_must_be_width_gates(small_space):
    with pytest.raises(ValueError, match="held_open"):
        Router(RouterConfig(num_codes=2, held_open=[small_space.dim - 1]), small_space)
