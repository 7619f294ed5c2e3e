"""The models shipped in bundles/: they load from safetensors with their checksums, fit the size budget, and do
what the README says they do (checked on a few prompts with few sampling steps, so it stays fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router.pipeline import RoutedPipeline
from training.data.labels import collate
from training.evaluate import evaluation_samples
from training.evaluator import DomainEvaluator, alignment, read_images

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = ROOT / "bundles"
TEACHER = BUNDLES / "shapes" / "teacher"
EVALUATOR = BUNDLES / "shapes" / "evaluator"


def test_everything_shipped_stays_under_30_mb():
    size = sum(p.stat().st_size for p in BUNDLES.rglob("*") if p.is_file())
    assert size < 30 * 2**20


@pytest.fixture(scope="module")
def evaluator() -> DomainEvaluator:
    return DomainEvaluator.load(EVALUATOR)


def test_the_evaluator_reads_real_images(evaluator):
    samples = evaluation_samples("test", 64, seed=11)
    images, _ = collate(samples)
    scores = [alignment(s.scene, r) for s, r in zip(samples, read_images(evaluator, images), strict=True)]
    assert np.mean(scores) >= 0.97


def test_the_teacher_draws_what_simple_prompts_ask_for(evaluator):
    pipeline = RoutedPipeline.load(TEACHER)
    samples = [s for s in evaluation_samples("test", 80, seed=5) if s.scene.tier in (1, 4)][:12]
    made = pipeline([s.caption for s in samples], seeds=list(range(len(samples))), steps=12)
    scores = [alignment(s.scene, r) for s, r in zip(samples, read_images(evaluator, made.images), strict=True)]
    assert np.mean(scores) >= 0.8, list(zip([s.caption for s in samples], scores, strict=True))
