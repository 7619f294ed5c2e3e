"""benchmarks/routing.py: the routing of the evaluation prompts, from a router folder or a bundle."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.routing import main
from tests.helpers import save_tiny_teacher
from training.evaluation.evaluate import evaluation_samples


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from training.export import random_bundle

    root = tmp_path_factory.mktemp("routing")
    teacher = save_tiny_teacher(root / "teacher")
    return random_bundle(teacher, root / "bundle", num_codes=3, keeps=[1.0, 0.5, 0.3], seed=0)


COUNTS = ["--num-prompts", "40", "--num-heldout", "12", "--num-paraphrases", "24"]


def test_bundle_and_its_router_folder_give_the_same_report(tmp_path, bundle, capsys):
    counts = COUNTS
    assert main(["--bundle", str(bundle), "--name", "b", "--out", str(tmp_path), *counts]) == 0
    assert main(["--router", str(bundle / "router"), "--name", "r", "--out", str(tmp_path), *counts]) == 0
    from_bundle = json.loads((tmp_path / "b.json").read_text())
    from_router = json.loads((tmp_path / "r.json").read_text())
    assert from_bundle["splits"] == from_router["splits"]
    ratios = from_bundle["code_macs_ratio"]
    assert len(ratios) == 3 and ratios[0] == 1.0 and ratios[2] < ratios[1] < 1.0
    assert "difficulty" not in from_bundle["splits"]["test"]  # its router has no difficulty head
    for split, count in (("test", 40), ("heldout", 12), ("paraphrases", 24)):
        summary = from_bundle["splits"][split]
        load = summary["load"]
        assert math.isclose(sum(load.values()), 1.0) and all(
            share * count == round(share * count) for share in load.values()
        )
        expected = sum(share * ratios[int(code)] for code, share in load.items())
        assert math.isclose(summary["macs_ratio"]["overall"], expected)
    assert "| test |" in (tmp_path / "b.md").read_text()


def test_a_teacher_folder_is_refused_by_name(tmp_path, bundle, capsys):
    teacher = bundle.parent / "teacher"
    assert main(["--bundle", str(teacher), "--name", "t", "--out", str(tmp_path)]) == 2
    assert str(teacher) in capsys.readouterr().err


def test_a_router_with_a_difficulty_head_has_its_rating_of_each_tier_reported(tmp_path, bundle):
    from router.model import Router

    plain = Router.load(bundle / "router")
    config = plain.config.model_copy(update={"difficulty_weight": 1.0})
    rated = Router(config, plain.space, plain.resolution)
    rated.load_state_dict(plain.state_dict(), strict=False)
    torch.nn.init.normal_(rated.difficulty.out.weight, generator=torch.Generator().manual_seed(0))
    rated.save(tmp_path / "router")
    assert main(["--router", str(tmp_path / "router"), "--name", "d", "--out", str(tmp_path), *COUNTS]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    samples = evaluation_samples("paraphrases", 24, seed=7)
    embedding = rated.encoder.encode([s.caption for s in samples]).pooled
    expected = rated.difficulty(embedding.double())
    tier1 = [i for i, s in enumerate(samples) if s.scene.tier == 1]
    rating = report["splits"]["paraphrases"]["difficulty"]
    assert math.isclose(rating["tier1"], expected[tier1].mean().item(), rel_tol=1e-6)
    assert math.isclose(rating["overall"], expected.mean().item(), rel_tol=1e-6)
    assert "difficulty rating" in (tmp_path / "d.md").read_text()


def test_argmax_routes_without_the_routers_balancing_offsets(tmp_path, bundle):
    from router.model import Router

    router = Router.load(bundle / "router")
    router.code_offsets.zero_()[1] = 1e3  # offsets that send every prompt to code 1
    router.save(tmp_path / "router")
    base = ["--router", str(tmp_path / "router"), "--out", str(tmp_path), *COUNTS]
    assert main([*base, "--name", "offsets"]) == 0 and main([*base, "--name", "argmax", "--argmax"]) == 0
    with_offsets = json.loads((tmp_path / "offsets.json").read_text())
    plain = json.loads((tmp_path / "argmax.json").read_text())
    assert with_offsets["splits"]["test"]["load"]["1"] == 1.0 and not with_offsets["argmax"]
    routed = evaluation_samples("test", 40, seed=7)
    embedding = router.encoder.encode([s.caption for s in routed]).pooled
    router.code_offsets.zero_()
    expected = torch.bincount(router.route_embeddings(embedding).codes, minlength=3) / 40
    assert [plain["splits"]["test"]["load"][str(k)] for k in range(3)] == pytest.approx(expected.tolist())
    assert plain["argmax"]
