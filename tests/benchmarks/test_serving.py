"""benchmarks/serving.py's offline parts on a tiny bundle: every model at every batch size, ratios against the
teacher, the offline runs of the server's requests, and the targets (what they measure is only meaningful on the
real bundle; here, that they run and relate the figures as they say)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from benchmarks.serving import (
    BATCH_COLOURS,
    BATCHES,
    TEACHER,
    WHOLE_BATCHES,
    cores_by_part,
    layout_speedup,
    offline_engine,
    offline_gated_teacher,
    plot,
    request_texts,
    side_by_side,
    steady_rate,
    table,
    targets,
    unet_latency,
)


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


def test_the_layout_comparison_times_every_model_both_ways_and_leaves_the_models_as_they_were(models):
    import torch

    bundle, teacher = models
    conv = next(m for m in bundle.experts[1].modules() if isinstance(m, torch.nn.Conv2d))
    before = conv.weight.is_contiguous()
    rows = layout_speedup(bundle, teacher, repeats=1, batches=(1, 2))
    assert [(r["model"], r["batch"]) for r in rows] == [(m, b) for b in (1, 2) for m in ("teacher", "code 0", "code 1")]
    assert all(r["speedup"] == pytest.approx(r["nchw_s"] / r["channels_last_s"]) for r in rows)
    assert conv.weight.is_contiguous() == before  # timed on copies


def test_offline_runs_serve_every_request_and_the_gated_teacher_runs_mixed_batches(models):
    bundle, teacher = models
    texts = request_texts(["a red circle", "a blue square in the top left corner", "the letter A"], 5)
    assert texts[3] == "a red circle" and len(texts) == 5
    engine = offline_engine(bundle, texts, steps=2, batch=2, workers=2, threads=1)
    alone = offline_engine(bundle, texts, steps=2, batch=2, workers=1, threads=1)
    gated = offline_gated_teacher(bundle, teacher, texts, steps=2, batch=4, workers=2, threads=1)
    for run in (engine, alone, gated):
        assert run["images"] == 5 and run["images_per_s"] == pytest.approx(5 / run["wall_s"])
        assert 0 < run["cores"] <= os.cpu_count() + 0.1  # the cores the run kept busy, beside its throughput
    # the gates come off with the run (the workers' copies too): the teacher is the full model again
    modules = list(teacher.experts[0].modules())
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in modules)


def _figures(models) -> dict:
    bundle, teacher = models
    texts = request_texts(["a red circle"], 2)
    return {
        "threads": 1,
        "workers": 2,
        "clients": 1,
        "requests": 2,
        "steps": 1,
        "batch": 2,
        "unet": unet_latency(bundle, teacher, repeats=1),
        "gemm_gmacs_per_s": 1.0,
        "layout": layout_speedup(bundle, teacher, repeats=1, batches=(1,)),
        "offline_rounds": [
            {
                "engine": offline_engine(bundle, texts, steps=1, batch=2, workers=2, threads=1),
                "engine_one_worker": offline_engine(bundle, texts, steps=1, batch=2, workers=1, threads=1),
                "gated_teacher": offline_gated_teacher(bundle, teacher, texts, steps=1, batch=2, workers=2, threads=1),
            }
        ],
        "server": [],
        "rounds": [],
        "overload": [],
    }


def _server_row(config: str, images_per_s: float, macs_ratio: float) -> dict:
    return {
        "config": config,
        "images_per_s": images_per_s,
        "run_images_per_s": 0.9 * images_per_s,
        "latency_p50_s": 1.0,
        "latency_p95_s": 2.0,
        "mean_batch_images": 3.5,
        "mean_macs_ratio": macs_ratio,
        "router_share": 0.025,
        "encode_share": 0.024,
        "outside_server_share": 0.03,
        "engine_busy_share": 0.99,
    }


def test_the_steady_rate_leaves_out_the_first_wave_and_the_drain():
    # Two clients, one image per answer. The first wave is answered at 3 and 3.5 s (its requests were routed as a
    # burst), then an answer every second; the last request goes out with the answer at 7.5 s, and the drain's two
    # answers take 3 s more. The whole run: 8 images in 10.5 s, 0.76 a second.
    answers = [(3.0, 1), (3.5, 1), (4.5, 1), (5.5, 1), (6.5, 1), (7.5, 1), (9.5, 1), (10.5, 1)]
    assert steady_rate(answers, last_sent=7.5, clients=2) == pytest.approx(4 / 4.0)
    assert steady_rate(list(reversed(answers)), last_sent=7.5, clients=2) == pytest.approx(1.0)  # answer order
    # no window: every request was sent with the first wave's answers
    assert steady_rate(answers[:4], last_sent=3.5, clients=2) is None
    assert steady_rate([(1.0, 2), (2.0, 2), (3.0, 4)], last_sent=3.0, clients=1) == pytest.approx(6 / 2.0)


def test_a_servers_cores_are_split_into_its_engine_routing_and_the_rest():
    before = {"aptp-engine-0": 10.0, "aptp-engine-1": 10.0, "aptp-routing": 1.0, "python": 3.0}
    after = {"aptp-engine-0": 19.0, "aptp-engine-1": 18.0, "aptp-routing": 1.5, "python": 3.5, "anyio_worker": 0.5}
    parts = cores_by_part(before, after, wall=10.0)
    # a thread born meanwhile (anyio_worker) counts all its time
    assert parts == pytest.approx({"engine": 1.7, "routing": 0.05, "rest": 0.1})
    assert cores_by_part(None, after, wall=10.0) is None  # no /proc


def test_targets_hold_the_server_against_the_ideal_the_offline_engine_and_the_gated_teacher_round_by_round(models):
    figures = _figures(models)
    without_server = {row["target"]: row for row in targets(figures)}
    assert without_server["routing share of end-to-end time"]["met"] is None  # no server part: not judged
    assert without_server["the same beyond prompt encoding (choosing the code)"]["met"] is None
    assert without_server["bundle images/s / the same engine's offline"]["met"] is None
    offline = figures["offline_rounds"][0]
    engine, gated = offline["engine"]["images_per_s"], offline["gated_teacher"]["images_per_s"]
    # two rounds on a drifting machine: the second twice as fast for every configuration and the offline run
    figures["offline_rounds"] = [
        offline,
        {name: {**run, "images_per_s": 2 * run["images_per_s"]} for name, run in offline.items()},
    ]
    figures["rounds"] = [
        {
            WHOLE_BATCHES: _server_row(WHOLE_BATCHES, scale * engine, 0.5),
            TEACHER: _server_row(TEACHER, scale * engine / 2.5, 1.0),
        }
        for scale in (1, 2)
    ]
    figures["server"] = [figures["rounds"][0][WHOLE_BATCHES], figures["rounds"][0][TEACHER]]
    rows = {row["target"]: row for row in targets(figures)}
    ideal = rows["bundle images/s / ideal (teacher's / routed MAC ratio)"]
    assert ideal["value"] == pytest.approx(1.25) and ideal["met"] is True  # 2.5 x the teacher at half its MACs
    assert rows["bundle images/s / the same engine's offline"]["value"] == pytest.approx(1.0)
    assert rows["bundle images/s / per-sample gated teacher's offline"]["value"] == pytest.approx(engine / gated)
    assert rows["routing share of end-to-end time"]["met"] is False  # 2.5%, nearly all of it encoding
    beyond = rows["the same beyond prompt encoding (choosing the code)"]
    assert beyond["value"] == pytest.approx(0.001) and beyond["met"] is True
    assert rows["share of end-to-end time outside the server (HTTP, JSON, PNG)"]["met"] is False


def test_the_table_and_plot_render_every_part(models):
    figures = _figures(models)
    figures["server"] = [
        {**_server_row(WHOLE_BATCHES, 2.0, 0.5), "rounds_images_per_s": [1.5, 2.0, 2.5], "server_cores": 1.87}
        | {"server_cores_by_part": {"engine": 1.7, "routing": 0.05, "rest": 0.12}},
        *(_server_row(f"other configuration {i}", 1.5, 0.5) for i in range(8)),  # more than there are colours
        _server_row(TEACHER, 1.0, 1.0),  # no CPU reading where /proc is missing
    ]
    overload = {"offered": 60, "offered_per_s": 2.0, "seconds": 30.0, "served": 40, "refused": 20, "failed": 0}
    overload |= {"served_images_per_s": 1.9, "latency_p50_s": 3.0, "latency_p95_s": 4.0, "refusal_p95_s": 0.01}
    figures["overload"] = [
        {"config": "refuse when full (default)", **overload, "degraded_share": 0.0, "mean_macs_ratio": 0.6}
        | {"rounds_served_images_per_s": [1.8, 1.9, 2.1]},
        {"config": "degrade when full", **overload, "degraded_share": None, "mean_macs_ratio": None},
    ]
    light = {"offered": 30, "offered_per_s": 1.0, "seconds": 30.0, "served": 30, "served_images_per_s": 0.98}
    figures["light"] = [
        {"config": "whole batches", **light, "latency_p50_s": 2.5, "latency_p95_s": 3.5}
        | {"rounds_latency_p50_s": [2.4, 2.5, 2.9], "mean_batch_images": 2.25},
        {"config": "step-level (default)", **light, "latency_p50_s": 1.5, "latency_p95_s": 2.0}
        | {"rounds_latency_p50_s": [1.5], "mean_batch_images": None},
    ]
    figures["targets"] = targets(figures)
    text = table(figures)
    assert "### Light load: 1.0 requests/s for 30 s" in text
    assert "| whole batches | 30 | 0.98 | 2.50 | 2.40, 2.50, 2.90 | 3.50 | 2.2 |" in text
    assert "| step-level (default) | 30 | 0.98 | 1.50 | 1.50 | 2.00 | - |" in text
    assert "| code 1 |" in text and "GEMM" in text and "### Offline" in text
    assert "| code 1 | 1 |" in text  # the layout comparison, per model and batch size
    assert "| degrade when full | 40 | 20 | 0 | 1.90 | 1.90 |" in text and "### Targets" in text
    assert "| refuse when full (default) | 40 | 20 | 0 | 1.90 | 1.80, 1.90, 2.10 |" in text
    # steady rate, every round, the whole run's, x teacher
    assert f"| {WHOLE_BATCHES} | 2.00 | 1.50, 2.00, 2.50 | 1.80 | 2.00 |" in text
    server_part = text.split("### Server at saturation")[1].split("###")[0]
    server_rows = [line for line in server_part.splitlines() if line.startswith(("| bundle", "| teacher |"))]
    assert server_rows[0].endswith("| 0.99 | 1.87 (1.70 / 0.05 / 0.12) |") and server_rows[1].endswith("| 0.99 | - |")
    assert "cores)" in text  # the offline runs' cores beside their throughput
    assert "2 worker(s) |" in text and "| the same, one worker on 1 threads |" in text

    # the plot: a point per model at each plotted batch size, and one per server configuration
    import xml.etree.ElementTree as ElementTree

    svg = ElementTree.fromstring(plot(figures))
    circles = svg.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 3 * len(BATCH_COLOURS) + len(figures["server"])


def test_side_by_side_runs_every_task_on_its_workers_at_once_and_raises_a_tasks_error():
    meeting = threading.Barrier(2, timeout=10)  # breaks unless two tasks run at the same time
    counts: list[int] = []

    def task(worker: int) -> None:
        meeting.wait()
        counts.append((worker, torch.get_num_threads()))

    side_by_side([task] * 4, workers=2, threads=1)
    assert sorted(counts) == [(0, 1), (0, 1), (1, 1), (1, 1)]  # each worker ran two, on one intra-op thread

    def broken(worker: int) -> None:
        raise RuntimeError("batch 3 failed")

    with pytest.raises(RuntimeError, match="batch 3 failed"):
        side_by_side([broken], workers=2, threads=1)
