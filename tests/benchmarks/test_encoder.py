"""benchmarks/encoder.py on a tiny bundle (the real MiniLM encoder): the variants encode what the bundle's own
conditioning encodes, eager is the reference, int8 linear layers move the states, and every variant is timed at
both batch sizes. Compiling takes most of a minute, so it is left to the benchmark's own runs."""

from __future__ import annotations

import pytest

from benchmarks.encoder import EAGER, INT8, deviation, encode_seconds, table, variants


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from aptp.pipeline import RoutedPipeline
    from tests.helpers import save_tiny_teacher
    from training.export import random_bundle

    root = tmp_path_factory.mktemp("encoder-benchmark")
    bundle = random_bundle(save_tiny_teacher(root / "teacher"), root / "bundle", num_codes=2, keeps=[1.0, 0.5])
    return RoutedPipeline.load(bundle)


PROMPTS = ["a red circle at the top", "two small blue squares beside a green triangle", "a star", "a big yellow ring"]


def test_eager_is_the_bundles_own_conditioning_and_int8_moves_the_states(pipeline):
    conditioners = variants(pipeline, (EAGER, INT8))
    assert conditioners[EAGER].encode(PROMPTS).states.equal(pipeline.encode(PROMPTS).states)
    assert pipeline.encoder.encoder.model is conditioners[EAGER].encoder.model  # the bundle's model is not replaced
    assert pipeline.encoder.encoder.model is not conditioners[INT8].encoder.model

    found = deviation(pipeline, conditioners, PROMPTS)
    assert found[EAGER] == {"token_states_error": 0.0, "embedding_error": 0.0, "other_code_share": 0.0}
    assert found[INT8]["token_states_error"] > 1e-3 and found[INT8]["embedding_error"] > 1e-3
    assert 0.0 <= found[INT8]["other_code_share"] <= 1.0


def test_every_variant_is_timed_per_prompt_at_every_batch(pipeline):
    conditioners = variants(pipeline, (EAGER, INT8))
    seconds = {batch: encode_seconds(conditioners, PROMPTS * 4, batch, repeats=2) for batch in (1, 8)}
    assert all(set(by_variant) == {EAGER, INT8} for by_variant in seconds.values())
    assert all(s > 0 for by_variant in seconds.values() for s in by_variant.values())

    figures = {
        "threads": 1,
        "first_compiled_call_s": 0.0,
        "seconds_per_prompt": seconds,
        "deviation": {"some": deviation(pipeline, conditioners, PROMPTS)},
        "prompts": {"some": len(PROMPTS)},
    }
    text = table(figures)
    assert "| int8 linear layers | some (4) |" in text and "| eager | some" not in text
