"""benchmarks/routing.py: the routing of the evaluation prompts, from a router folder or a bundle."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.routing import main
from tests.helpers import save_tiny_teacher


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from training.export import random_bundle

    root = tmp_path_factory.mktemp("routing")
    teacher = save_tiny_teacher(root / "teacher")
    return random_bundle(teacher, root / "bundle", num_codes=3, keeps=[1.0, 0.5, 0.3], seed=0)


def test_bundle_and_its_router_folder_give_the_same_report(tmp_path, bundle, capsys):
    counts = ["--num-prompts", "40", "--num-heldout", "12"]
    assert main(["--bundle", str(bundle), "--name", "b", "--out", str(tmp_path), *counts]) == 0
    assert main(["--router", str(bundle / "router"), "--name", "r", "--out", str(tmp_path), *counts]) == 0
    from_bundle = json.loads((tmp_path / "b.json").read_text())
    from_router = json.loads((tmp_path / "r.json").read_text())
    assert from_bundle["splits"] == from_router["splits"]
    ratios = from_bundle["code_macs_ratio"]
    assert len(ratios) == 3 and ratios[0] == 1.0 and ratios[2] < ratios[1] < 1.0
    for split, count in (("test", 40), ("heldout", 12)):
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
