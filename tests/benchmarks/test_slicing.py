"""benchmarks/slicing.py on the embedded domain's shape: every seed is timed at every batch as a guided call, and the
figures it derives (GMAC/s, latency per MAC against the full model) follow from the times and MACs it measured."""

from __future__ import annotations

import pytest

from benchmarks.slicing import run, write


def test_every_seed_is_timed_at_every_batch_and_the_rates_follow_from_the_times(tmp_path):
    rows = run(["pixel-32"], keep=0.5, batches=[1, 2], seeds=[0, 1], repeats=5, seconds=0.0)
    assert [(r["seed"], r["batch"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for row in rows:
        assert row["repeats"] == 3  # no time budget: the least
        assert row["mac_ratio_model"] == pytest.approx(row["mac_ratio_flop_counter"], rel=1e-3)
        rows_per_call = 2 * row["batch"]  # guided: an unconditioned and a conditioned row per image
        assert row["gmacs_per_s_full"] * row["latency_full_s"] == pytest.approx(rows_per_call * row["gmacs_full"])
        assert row["gmacs_per_s_sliced"] * row["latency_sliced_s"] == pytest.approx(rows_per_call * row["gmacs_sliced"])
        assert row["latency_per_mac_x_full"] == pytest.approx(row["gmacs_per_s_full"] / row["gmacs_per_s_sliced"])
    same_arch = [r for r in rows if r["seed"] == 0]
    assert same_arch[0]["gmacs_sliced"] == same_arch[1]["gmacs_sliced"] < same_arch[0]["gmacs_full"]

    write(rows, gemm=50.0, out=tmp_path, name="slicing", config={})
    table = (tmp_path / "slicing.md").read_text()
    assert "GEMM (2048^3 fp32) on the same threads: 50.0 GMAC/s" in table
    assert table.count("| pixel-32 |") == 4
