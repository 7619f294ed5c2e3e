"""benchmarks/code_tiers.py: every evaluation prompt made by every chosen code of a bundle, scored per tier."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.code_tiers import code_images, main
from tests.helpers import save_tiny_teacher
from training.evaluation.evaluate import evaluate_split, evaluation_samples, run_eval
from training.evaluation.evaluator import DomainEvaluator, EvaluatorConfig


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from training.export import random_bundle

    root = tmp_path_factory.mktemp("code-tiers")
    teacher = save_tiny_teacher(root / "teacher")
    return random_bundle(teacher, root / "bundle", num_codes=2, keeps=[1.0, 0.4], seed=0)


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("evaluator") / "evaluator"
    DomainEvaluator(EvaluatorConfig(width=8, feature_dim=32)).save(folder)
    return folder


def test_each_code_scores_the_prompts_aptp_eval_routes_to_it_as_aptp_eval_does(tmp_path, bundle, evaluator):
    from aptp.pipeline import RoutedPipeline

    count = 12
    args = ["--bundle", str(bundle), "--evaluator", str(evaluator), "--splits", "test", "--num-prompts", str(count)]
    assert main([*args, "--name", "tiers", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tiers.json").read_text())
    assert set(report["splits"]["test"]) == {"0", "1"}
    assert report["code_macs_ratio"][1] < report["code_macs_ratio"][0]
    assert "| test | code 1 |" in (tmp_path / "tiers.md").read_text()

    # every code was run, so routing is scored from the same images: the router's choice, and the best tier map
    per_code = [report["splits"]["test"][str(c)]["alignment_per_prompt"] for c in (0, 1)]
    routing = report["routing"]["test"]
    pipeline = RoutedPipeline.from_pretrained(bundle)
    chosen = pipeline.route(pipeline.encode([s.caption for s in evaluation_samples("test", count, 7)])).codes
    assert routing["router"]["alignment_per_prompt"] == [per_code[c][i] for i, c in enumerate(chosen)]
    ratios = report["code_macs_ratio"]
    assert routing["router"]["macs_ratio"] == pytest.approx(sum(ratios[c] for c in chosen) / count)
    policy = routing["tier_policy"]
    assert policy["macs_ratio"] <= routing["router"]["macs_ratio"] + 1e-9
    cheapest = min(range(2), key=lambda c: ratios[c])
    assert policy["alignment"]["overall"] >= sum(per_code[cheapest]) / count - 1e-9  # sending all to it is allowed
    assert "| test | tier policy |" in (tmp_path / "tiers.md").read_text()

    # aptp eval's own images, with its router steered to one code: code_images must make them again
    pipeline = RoutedPipeline.from_pretrained(bundle)
    samples = evaluation_samples("test", count, 7)
    for code in (0, 1):
        pipeline.router.code_offsets.zero_()[code] = 1e3
        routed = evaluate_split(pipeline, DomainEvaluator.load(evaluator), "test", count, seed=7)
        assert set(routed["_codes"]) == {code}
        forced = code_images(pipeline, code, samples, seed=7, batch_size=5)
        assert (forced.int() - routed["_generated"].int()).abs().max() <= 1  # batches of 5, not 12: a level at most


def test_a_code_the_bundle_lacks_is_refused_by_number(tmp_path, bundle, evaluator, capsys):
    args = ["--bundle", str(bundle), "--evaluator", str(evaluator), "--codes", "0", "5", "--name", "x"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--codes [5]" in err and "0 to 1" in err


def test_a_reference_report_is_paired_with_each_code_prompt_by_prompt(tmp_path, bundle, evaluator):
    """`aptp eval` of the bundle steered to code 1 is the reference: code 1 scores what it scored, prompt by prompt,
    on the first prompts of the longer report (the same prompts and seeds)."""
    from aptp.pipeline import RoutedPipeline

    pipeline = RoutedPipeline.from_pretrained(bundle)
    pipeline.router.code_offsets.zero_()[1] = 1e3
    counts = {"num_prompts": 16, "num_heldout": 2, "num_paraphrases": 0}
    run_eval(pipeline, DomainEvaluator.load(evaluator), tmp_path / "ref", "code-one", **counts)
    reference = tmp_path / "ref" / "code-one.json"
    args = ["--bundle", str(bundle), "--evaluator", str(evaluator), "--splits", "test", "--num-prompts", "12"]
    assert main([*args, "--reference", str(reference), "--name", "paired", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "paired.json").read_text())
    scored = json.loads(reference.read_text())["results"][0]["alignment_per_prompt"][:12]
    code_one = report["splits"]["test"]["1"]
    differ = sum(a != b for a, b in zip(code_one["alignment_per_prompt"], scored, strict=True))
    assert differ <= 1, differ  # images within a level of eval's (other batches): a prompt may read otherwise
    assert abs(code_one["minus_reference"]["overall"]["mean"]) <= 0.05
    assert report["references"]["code-one"]["splits"]["test"]["alignment"]["overall"] == pytest.approx(sum(scored) / 12)
    table = (tmp_path / "paired.md").read_text()
    assert "| test | code-one |" in table and "minus `code-one`'s" in table


def test_a_reference_of_too_few_prompts_or_another_seed_is_refused_by_name(tmp_path, bundle, evaluator, capsys):
    from aptp.pipeline import RoutedPipeline

    pipeline = RoutedPipeline.from_pretrained(bundle)
    counts = {"num_prompts": 4, "num_heldout": 2, "num_paraphrases": 0}
    run_eval(pipeline, DomainEvaluator.load(evaluator), tmp_path, "short", **counts)
    run_eval(pipeline, DomainEvaluator.load(evaluator), tmp_path, "seed-3", seed=3, **counts)
    args = ["--bundle", str(bundle), "--evaluator", str(evaluator), "--splits", "test", "--name", "x"]
    assert main([*args, "--num-prompts", "8", "--reference", str(tmp_path / "short.json")]) == 2
    assert "'short' scores 4 test prompts" in capsys.readouterr().err
    assert main([*args, "--num-prompts", "4", "--reference", str(tmp_path / "seed-3.json")]) == 2
    assert "'seed-3' was evaluated at seed 3, not --seed 7" in capsys.readouterr().err
    assert main([*args, "--reference", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err
