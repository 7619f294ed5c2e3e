"""benchmarks/compile.py's comparison on a tiny bundle. Compiling takes minutes here, so the "compiled" side is a
second eager load: what is checked is that every model is timed both ways at every batch and that the ratios relate
as the report says (what compiling buys is only meaningful on the real bundle)."""

from __future__ import annotations

import pytest

from benchmarks.compile import KINDS, P1, compile_seconds, eager_against_compiled, table, targets
from benchmarks.serving import TEACHER


@pytest.fixture(scope="module")
def two_loads(tmp_path_factory):
    from aptp.pipeline import RoutedPipeline
    from tests.helpers import save_tiny_teacher
    from training.export import random_bundle

    root = tmp_path_factory.mktemp("compile-benchmark")
    teacher = save_tiny_teacher(root / "teacher")
    bundle = random_bundle(teacher, root / "bundle", num_codes=2, keeps=[1.0, 0.5])
    return [(RoutedPipeline.load(bundle), RoutedPipeline.load(teacher)) for _ in KINDS]


def test_every_model_is_timed_both_ways_at_every_batch_against_its_own_kinds_teacher(two_loads):
    eager, compiled = two_loads
    rows = eager_against_compiled(eager, compiled, repeats=1, batches=(1, 2))
    assert [(r["model"], r["batch"]) for r in rows] == [(m, b) for b in (1, 2) for m in (TEACHER, "code 0", "code 1")]
    for row in rows:
        assert row["speedup"] == pytest.approx(row["eager_s"] / row["compiled_s"])
        if row["model"] == TEACHER:
            assert row["mac_ratio"] == 1.0
            assert row["eager_latency_per_mac"] == row["compiled_latency_per_mac"] == 1.0
    assert all(r["mac_ratio"] < 1 for r in rows if r["model"] == "code 1")

    bars = targets(rows)
    assert [(t["batch"], t["kind"]) for t in bars] == [(b, k) for b in (1, 2) for k in KINDS]
    for bar in bars:
        codes = [r for r in rows if r["batch"] == bar["batch"] and r["model"] != TEACHER]
        assert bar["worst_latency_per_mac"] == max(r[f"{bar['kind']}_latency_per_mac"] for r in codes)
        assert bar["met"] == (bar["worst_latency_per_mac"] <= P1)

    figures = {"mode": "default", "rows": rows, "targets": bars, "compile_seconds": compile_seconds(*compiled)}
    assert set(figures["compile_seconds"]) == {TEACHER, "code 0", "code 1"}
    text = table(figures)
    assert text.count("| code 1 |") == 2 and "First compiled call" in text
