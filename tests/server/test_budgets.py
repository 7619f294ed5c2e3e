"""Compute budgets per request (`max_macs_ratio`, `quality`) and the opt-in overload policy that serves a cheaper
code instead of answering 429."""

from __future__ import annotations

import pytest

from server.engine import GenerationJob
from tests.server.conftest import NUM_CODES


def _costs(client) -> list[float]:
    return [code["macs_ratio"] for code in client.get("/v1/codes").json()["codes"]]


def test_quality_tiers_serve_the_cheapest_and_the_costliest_code(client):
    costs = _costs(client)
    for quality, expected in (("fast", costs.index(min(costs))), ("best", costs.index(max(costs)))):
        response = client.post("/generate", json={"prompt": "a red circle", "quality": quality, "seed": 1})
        assert response.status_code == 200, response.text
        report = response.json()["report"]
        assert report["code"] == report["requested_code"] == expected and report["degraded"] is False
        assert report["macs_per_call"] / report["teacher_macs_per_call"] == pytest.approx(costs[expected])


def test_a_macs_cap_keeps_the_request_within_it(client):
    cheapest = min(_costs(client))
    response = client.post("/generate", json={"prompt": "a red circle", "max_macs_ratio": cheapest})
    assert response.status_code == 200, response.text
    report = response.json()["report"]
    assert report["macs_per_call"] <= cheapest * report["teacher_macs_per_call"] * (1 + 1e-9)


def test_a_budget_that_cannot_be_met_is_refused_before_routing(client, pipeline, monkeypatch):
    calls = []
    original = pipeline.encode
    monkeypatch.setattr(pipeline, "encode", lambda texts: calls.append(texts) or original(texts))
    message = "no code costs at most 1e-06 of the teacher's MACs per call; the cheapest costs"
    response = client.post("/generate", json={"prompt": "a red circle", "max_macs_ratio": 1e-6})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "max_macs_ratio"] and message in detail["msg"]
    assert calls == []


@pytest.mark.parametrize("body, field", [({"quality": "cheap"}, "quality"), ({"max_macs_ratio": 0}, "max_macs_ratio")])
def test_malformed_budgets_answer_422_naming_the_field(client, body, field):
    response = client.post("/generate", json={"prompt": "a red circle", **body})
    assert response.status_code == 422
    assert ["body", field] in [error["loc"] for error in response.json()["detail"]]


def test_a_quality_tier_picks_among_the_codes_within_the_cap(client):
    costs = _costs(client)
    cheapest = min(costs)
    body = {"prompt": "a red circle", "quality": "best", "max_macs_ratio": cheapest, "steps": 2}
    report = client.post("/generate", json=body).json()["report"]
    assert report["code"] == costs.index(cheapest)  # the costliest within a cap that admits only the cheapest


def test_openai_quality_names_map_to_budget_tiers(client):
    costs = _costs(client)
    low = client.post("/v1/images/generations", json={"prompt": "a red circle", "quality": "low"})
    assert low.status_code == 200, low.text
    assert low.json()["aptp"]["code"] == costs.index(min(costs))
    high = client.post("/v1/images/generations", json={"prompt": "a red circle", "quality": "hd"})
    assert high.json()["aptp"]["code"] == costs.index(max(costs))
    wrong = client.post("/v1/images/generations", json={"prompt": "a red circle", "quality": "ultra"})
    assert wrong.status_code == 400 and "quality" in wrong.text


def _fill(client, pipeline, code: int) -> None:
    """Put one request in `code`'s queue (it waits there for a batch that does not fill)."""
    job = GenerationJob(prompt=pipeline.encode(["a filler"]), seeds=[0], steps=2, guidance_scale=3.0)
    client.app.state.aptp.engine.submit(f"filler-{code}", code, job)


def test_a_full_queue_degrades_to_a_cheaper_code_when_the_server_is_set_to(make_client, pipeline):
    assert NUM_CODES == 2
    with make_client(
        batching="request", max_queue_size=1, max_batch_size=8, max_wait_ms=1500, degrade_when_full=True
    ) as client:
        costs = _costs(client)
        costliest, cheapest = costs.index(max(costs)), costs.index(min(costs))
        _fill(client, pipeline, costliest)
        response = client.post("/generate", json={"prompt": "a red circle", "quality": "best", "seed": 2})
        assert response.status_code == 200, response.text
        report = response.json()["report"]
        assert report["requested_code"] == costliest and report["code"] == cheapest and report["degraded"] is True
        metrics = client.get("/metrics").text
        expected = f'aptp_degraded_requests_total{{code="{cheapest}",requested_code="{costliest}"}} 1.0'
        assert expected in metrics


def test_without_degradation_a_request_waits_in_its_own_codes_queue(make_client, pipeline):
    with make_client(batching="request", max_queue_size=1, max_batch_size=8, max_wait_ms=1500) as client:
        costs = _costs(client)
        costliest = costs.index(max(costs))
        _fill(client, pipeline, costliest)
        response = client.post("/generate", json={"prompt": "a red circle", "quality": "best"})
        assert response.status_code == 200, response.text
        report = response.json()["report"]
        assert report["code"] == report["requested_code"] == costliest and report["degraded"] is False


def test_degradation_never_serves_a_costlier_code(make_client, pipeline):
    """The cheapest code has nothing cheaper to fall back on: its request waits in its own queue."""
    with make_client(
        batching="request", max_queue_size=1, max_batch_size=8, max_wait_ms=1500, degrade_when_full=True
    ) as client:
        costs = _costs(client)
        cheapest = costs.index(min(costs))
        _fill(client, pipeline, cheapest)
        response = client.post("/generate", json={"prompt": "a red circle", "quality": "fast"})
        assert response.status_code == 200, response.text
        assert response.json()["report"]["code"] == cheapest and response.json()["report"]["degraded"] is False
