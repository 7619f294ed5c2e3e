"""benchmarks/serving.py's offline parts on a tiny bundle: every model at every batch size, ratios against the
teacher, and the gated mixed batch (what they measure is only meaningful on the real bundle; here, that they run
and relate the figures as they say)."""

from __future__ import annotations

import pytest

from benchmarks.serving import BATCH_COLOURS, BATCHES, gated_teacher, plot, table, unet_latency


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from aptp.pipeline import RoutedPipeline
    from tests.helpers import save_tiny_teacher
    from training.export import random_bundle

    root = tmp_path_factory.mktemp("serving-benchmark")
    teacher = save_tiny_teacher(root / "teacher")
    bundle = random_bundle(teacher, root / "bundle", num_codes=2, keeps=[1.0, 0.5])
    return RoutedPipeline.load(bundle), RoutedPipeline.load(teacher)


def test_unet_latency_covers_every_model_and_batch_against_the_teacher(models):
    bundle, teacher = models
    rows = unet_latency(bundle, teacher, repeats=1)
    assert {(r["model"], r["batch"]) for r in rows} == {
        (m, b) for m in ("teacher", "code 0", "code 1") for b in BATCHES
    }
    for row in rows:
        assert row["seconds"] > 0 and row["gmacs_per_s"] > 0
        if row["model"] == "teacher":
            assert row["latency_ratio"] == 1.0 and row["mac_ratio"] == 1.0
        assert row["latency_per_mac"] == pytest.approx(row["latency_ratio"] / row["mac_ratio"])
    cheap = [r for r in rows if r["model"] == "code 1"]
    assert all(r["mac_ratio"] < 1 for r in cheap)


def test_the_gated_teacher_runs_a_mixed_batch_and_the_table_renders(models):
    bundle, teacher = models
    gated = gated_teacher(bundle, teacher, batch=4, repeats=1)
    assert gated["gated_teacher_s"] > 0 and gated["sliced_experts_s"] > 0
    figures = {
        "threads": 1,
        "clients": 1,
        "requests": 1,
        "steps": 1,
        "unet": unet_latency(bundle, teacher, repeats=1),
        "gemm_gmacs_per_s": 1.0,
        "gated": gated,
        "server": [],
    }
    text = table(figures)
    assert "| code 1 |" in text and "GEMM" in text

    # the plot: a point per model at each plotted batch size, and one per server configuration
    import xml.etree.ElementTree as ElementTree

    server = [{"config": "bundle", "mean_batch_images": 3.5, "images_per_s": 2.0}]
    svg = ElementTree.fromstring(plot({**figures, "server": server}))
    circles = svg.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 3 * len(BATCH_COLOURS) + len(server)
