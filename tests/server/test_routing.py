"""The routing stage: prompts encoded and routed in batches on one thread, behind a bounded queue that refuses at once
when full."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server.routing import RoutingFull, RoutingStage
from tests.helpers import wait_for

PROMPTS = [["a red circle"], ["the letter K in green", "a blue square"], ["a yellow triangle at the bottom"]]


@pytest.fixture
def held(pipeline, monkeypatch):
    """The pipeline's encoder, held on its first call until `release` is set; records each call's batch."""
    release, batches, original = threading.Event(), [], pipeline.encode

    def encode(texts):
        batches.append(list(texts))
        if len(batches) == 1:
            release.wait(timeout=30)
        return original(texts)

    monkeypatch.setattr(pipeline, "encode", encode)
    return release, batches


def test_requests_that_arrive_meanwhile_are_routed_as_one_batch(pipeline, held):
    release, batches = held
    stage = RoutingStage(pipeline, max_pending=8, max_batch=8)
    try:
        first = stage.submit(["a green cross"])
        wait_for(lambda: batches)
        waiting = [stage.submit(texts) for texts in PROMPTS]  # queued while the first batch runs
        release.set()
        results = [future.result(timeout=60) for future in [first, *waiting]]
    finally:
        stage.stop()
    assert batches == [["a green cross"], [t for texts in PROMPTS for t in texts]]  # 3 requests, one encoder call
    for texts, routed in zip(PROMPTS, results[1:], strict=True):
        alone = pipeline.encode(texts)
        assert routed.code == pipeline.route(alone).codes[0] and len(routed.encoded) == len(texts)
        torch.testing.assert_close(routed.encoded.states, alone.states, atol=1e-5, rtol=1e-5)
        assert routed.batch_prompts == 4


def test_a_full_stage_refuses_at_once(pipeline, held):
    release, batches = held
    stage = RoutingStage(pipeline, max_pending=1, max_batch=8)
    try:
        running = stage.submit(["a green cross"])
        wait_for(lambda: batches)
        queued = stage.submit(["a red circle"])
        with pytest.raises(RoutingFull):
            stage.submit(["a blue square"])
        release.set()
        assert running.result(timeout=60).code >= 0 and queued.result(timeout=60).code >= 0
    finally:
        stage.stop()


def test_the_server_answers_429_when_routing_is_full(make_client, held):
    release, batches = held
    with make_client(max_routing_queue=1, max_wait_ms=20.0) as client, ThreadPoolExecutor(2) as pool:
        held_request = pool.submit(client.post, "/generate", json={"prompt": "a red circle", "steps": 2})
        wait_for(lambda: batches)
        queued_request = pool.submit(client.post, "/generate", json={"prompt": "a blue square", "steps": 2})
        wait_for(lambda: client.app.state.aptp.routing.pending >= 1)
        refused = client.post("/generate", json={"prompt": "a green cross", "steps": 2})
        release.set()
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.headers["retry-after-ms"] == "1000"
        assert "routing" in refused.json()["detail"]
        assert held_request.result().status_code == queued_request.result().status_code == 200
        metrics = client.get("/metrics").text
    assert 'aptp_rejections_total{reason="routing_full"} 1.0' in metrics


def test_a_burst_is_answered_200_or_429_never_an_error(make_client, held):
    """More concurrent requests than places: those beyond the places already taken by requests being routed are
    refused at once (429 with Retry-After), the rest are served."""
    release, batches = held
    with make_client(max_queue_size=1, max_batch_size=1, max_wait_ms=0.0) as client, ThreadPoolExecutor(8) as pool:
        first = pool.submit(client.post, "/generate", json={"prompt": "a red circle", "steps": 2})
        wait_for(lambda: batches)
        burst = [
            pool.submit(client.post, "/generate", json={"prompt": f"a blue square {i}", "steps": 2}) for i in range(6)
        ]
        time.sleep(0.5)  # the burst has been admitted or refused while the first request is still being routed
        release.set()
        statuses = [future.result().status_code for future in [first, *burst]]
        refused = [future.result() for future in burst if future.result().status_code == 429]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 2 and refused
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)


def test_warm_up_routes_a_lone_prompt_and_a_full_batch_through_the_stage(pipeline, held):
    release, batches = held
    release.set()
    stage = RoutingStage(pipeline, max_pending=4, max_batch=32)  # a batch larger than the queue must not refuse
    try:
        stage.warm_up()
        assert len(batches[0]) == 1
        assert sum(len(b) for b in batches) == 1 + 4
        assert stage.in_flight == 0 and stage.pending == 0
    finally:
        stage.stop()
