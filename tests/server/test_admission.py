"""Bad input, API keys, full queues, timeouts, failing batches, clients that leave, and draining."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.engine import GenerationJob
from tests.helpers import wait_for
from tests.server.conftest import server_settings


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 3000}, "prompt"),
        ({"prompt": "a red circle", "steps": 0}, "steps"),
        ({"prompt": "a red circle", "steps": 101}, "steps"),
        ({"prompt": "a red circle", "num_images": 5}, "num_images"),
        ({"prompt": "a red circle", "guidance_scale": 0.5}, "guidance_scale"),
        ({"prompt": "a red circle", "seed": -1}, "seed"),
        ({"prompt": "a red circle", "seed": "abc"}, "seed"),
        ({"prompt": "a red circle", "colour": "red"}, "colour"),
    ],
)
def test_invalid_generate_requests_answer_422_naming_the_field(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422
    locations = [error["loc"] for error in response.json()["detail"]]
    assert ["body", field] in locations, locations


def test_malformed_json_answers_422(client):
    response = client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize("blank", ["", " \n\t "], ids=["empty", "whitespace"])
def test_route_rejects_empty_prompt_lists_and_blank_prompts(client, blank):
    assert client.post("/route", json={"prompts": []}).status_code == 422
    response = client.post("/route", json={"prompts": ["ok", blank]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "prompts", 1]


def test_api_keys_guard_generation_but_not_health_or_metrics(make_client):
    with make_client(api_keys=["k1", "k2"]) as client:
        for path, body in [("/generate", {"prompt": "a red circle"}), ("/route", {"prompts": ["a red circle"]})]:
            missing = client.post(path, json=body)
            assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
            wrong = client.post(path, json=body, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            right = client.post(path, json=body, headers={"Authorization": "Bearer k2"})
            assert right.status_code == 200, right.text
        assert client.get("/v1/codes").status_code == 401
        openai_style = client.post("/v1/images/generations", json={"prompt": "a red circle"})
        assert openai_style.status_code == 401 and openai_style.json()["error"]["type"] == "authentication_error"
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert 'aptp_rejections_total{reason="unauthorized"} 6.0' in metrics.text


def test_a_request_let_in_is_queued_past_its_codes_share_never_refused_after_routing(make_client):
    """Admission holds a place of the total for a request while it is routed, so it is served even when its code's
    queue is past its share (here: one place per code, two requests of one code)."""
    # A long max_wait keeps the first request waiting for a batch that never fills.
    with (
        make_client(batching="request", max_queue_size=1, max_batch_size=8, max_wait_ms=1500) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        first = pool.submit(client.post, "/generate", json={"prompt": "a red circle", "seed": 1})
        wait_for(lambda: client.app.state.aptp.engine.scheduler.stats().queued_requests[_code(client)] == 1)
        second = client.post("/generate", json={"prompt": "a red circle", "seed": 2})
        assert second.status_code == 200, second.text
        assert first.result().status_code == 200
        metrics = client.get("/metrics").text
        assert 'aptp_rejections_total{reason="queue_full"} 0.0' in metrics


def _fill_every_queue(client, encoded) -> None:
    """One request in each code's queue (one place each): the server has no place left."""
    engine = client.app.state.aptp.engine
    job = GenerationJob(prompt=encoded, seeds=[0], steps=2, guidance_scale=3.0)
    for code in range(engine.scheduler.config.num_codes):
        engine.submit(f"filler-{code}", code, job)


def test_when_every_queue_is_full_the_prompt_is_not_even_encoded(make_client, pipeline, monkeypatch):
    encoded = pipeline.encode(["a red circle"])
    with make_client(batching="request", max_queue_size=1, max_batch_size=8, max_wait_ms=3000) as client:
        _fill_every_queue(client, encoded)
        encodes = []
        original = pipeline.encode
        monkeypatch.setattr(pipeline, "encode", lambda texts: encodes.append(texts) or original(texts))
        rejected = client.post("/generate", json={"prompt": "a red circle"})
        assert rejected.status_code == 429, rejected.text
        seconds, milliseconds = int(rejected.headers["Retry-After"]), int(rejected.headers["retry-after-ms"])
        assert seconds >= 1 and seconds - 1 < milliseconds / 1000 <= seconds  # the same wait, rounded up to seconds
        assert "every code's queue is full" in rejected.json()["detail"]
        assert encodes == []
        metrics = client.get("/metrics").text
        assert 'aptp_rejections_total{reason="queue_full"} 1.0' in metrics
        assert 'aptp_requests_total{code="none",status="rejected"} 1.0' in metrics  # refused before routing


def test_a_request_that_outlives_its_queue_timeout_answers_504(make_client):
    with make_client(batching="request", request_timeout_s=0.2, max_batch_size=8, max_wait_ms=3000) as client:
        response = client.post("/generate", json={"prompt": "a red circle"})
        assert response.status_code == 504
        assert "waited too long" in response.json()["detail"]
        assert sum(client.app.state.aptp.engine.scheduler.stats().queued_requests.values()) == 0
        metrics = client.get("/metrics").text
        assert 'aptp_rejections_total{reason="queue_timeout"} 1.0' in metrics
        assert 'status="timeout"} 1.0' in metrics


def test_a_failing_batch_answers_500_and_the_server_keeps_serving(make_client, pipeline, monkeypatch):
    real_generate = pipeline.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("expert exploded")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", flaky)
    with make_client(batching="request") as client:  # whole batches call `generate` (a step: test_engine)
        failed = client.post("/generate", json={"prompt": "a red circle"})
        assert failed.status_code == 500
        assert "expert exploded" in failed.json()["detail"]
        assert client.post("/generate", json={"prompt": "a red circle"}).status_code == 200
        assert client.get("/readyz").status_code == 200
        assert 'status="error"} 1.0' in client.get("/metrics").text


def test_draining_refuses_new_work_and_reports_not_ready(make_client):
    with make_client() as client:
        state = client.app.state.aptp
        state.begin_drain()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = client.post("/generate", json={"prompt": "a red circle"})
        assert refused.status_code == 503
        assert client.get("/healthz").status_code == 200


def test_app_shutdown_runs_queued_work_at_once_instead_of_dropping_it(make_client, pipeline):
    # The lifespan's shutdown path (what `uvicorn --factory server.app:create_app` runs on exit): work queued for a
    # batch that would fill only after 30 s runs at once. Submitted to the engine directly because the test client
    # stops answering in-flight HTTP calls when its context closes; the HTTP path under SIGTERM is covered by
    # tests/server/test_serve_process.py.
    encoded = pipeline.encode(["a red circle"])
    with make_client(batching="request", max_batch_size=8, max_wait_ms=30_000) as client:
        engine = client.app.state.aptp.engine
        futures = [
            engine.submit(
                f"queued-{seed}",
                0,
                GenerationJob(prompt=encoded, seeds=[seed], steps=2, guidance_scale=3.0),
            )
            for seed in range(3)
        ]
        assert engine.scheduler.stats().admitted == 3 and not any(f.done() for f in futures)
        began = time.monotonic()
    assert all(f.done() for f in futures)
    assert [f.result().images.shape[0] for f in futures] == [1, 1, 1]
    assert time.monotonic() - began < 20
    assert not engine.running


def test_a_client_that_disconnects_has_its_queued_work_dropped(tiny_bundle, pipeline):
    app = create_app(
        server_settings(tiny_bundle, batching="request", max_batch_size=8, max_wait_ms=4000, port=0), pipeline
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=60)
        port = server.servers[0].sockets[0].getsockname()[1]
        scheduler = app.state.aptp.engine.scheduler
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "a red circle"}, timeout=0.5)
        wait_for(lambda: scheduler.stats().aborted == 1, timeout=5)
        stats = scheduler.stats()
        assert sum(stats.queued_requests.values()) == 0 and stats.running_requests == 0
        assert stats.completed == 0
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'status="cancelled"} 1.0' in metrics
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_metrics_use_base_units_and_never_carry_the_prompt(client):
    secret_prompt = "a purple diamond whispering secrets"
    assert client.post("/generate", json={"prompt": secret_prompt}).status_code == 200
    text = client.get("/metrics").text
    assert "whispering" not in text
    for name in (
        "aptp_requests_total",
        "aptp_rejections_total",
        "aptp_queue_depth",
        "aptp_queue_images",
        "aptp_running_batches",
        "aptp_batch_size_bucket",
        "aptp_queue_wait_seconds_bucket",
        "aptp_compute_seconds_bucket",
        "aptp_request_seconds_bucket",
        "aptp_macs_total",
        "aptp_images_total",
        "aptp_router_seconds_bucket",
        "aptp_code_macs_per_call",
        "aptp_ready 1.0",
    ):
        assert name in text, name
    assert 'aptp_request_seconds_bucket{code="0",le="600.0"}' in text  # buckets reach minutes
    assert 'aptp_request_seconds_bucket{code="0",le="0.05"}' in text


def _code(client) -> int:
    return client.post("/route", json={"prompts": ["a red circle"]}).json()["routes"][0]["code"]


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations"])
def test_an_oversized_body_is_refused_with_413_before_it_is_parsed(make_client, path):
    body = json.dumps({"prompt": "a red circle", **{f"k{i}": "x" * 64 for i in range(2000)}})  # ~140 kB
    with make_client(max_body_bytes=65_536) as client:
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        streamed = client.post(path, content=(body[i : i + 4096].encode() for i in range(0, len(body), 4096)))
        metrics = client.get("/metrics").text
    assert response.status_code == streamed.status_code == 413
    message = response.json()["error"]["message"] if path.startswith("/v1/") else response.json()["detail"]
    assert "65536 bytes" in message and len(response.content) < 500  # a short answer, not an echo of the body
    assert 'aptp_rejections_total{reason="body_too_large"} 2.0' in metrics


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "   \n\t "}, "prompt"),
        ({"prompt": "a red circle", "steps": "2"}, "steps"),
        ({"prompt": "a red circle", "steps": True}, "steps"),
        ({"prompt": "a red circle", "num_images": 2.5}, "num_images"),
        ({"prompt": "a red circle", "seed": "7"}, "seed"),
    ],
    ids=["whitespace-prompt", "steps-as-string", "steps-as-bool", "images-as-fraction", "seed-as-string"],
)
def test_values_are_taken_as_given_not_coerced(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert field in {str(part) for problem in response.json()["detail"] for part in problem["loc"]}


def test_the_server_listens_while_it_warms_up_and_says_it_is_not_ready(make_client, monkeypatch):
    from server.engine import Engine

    release = threading.Event()
    monkeypatch.setattr(Engine, "warm_up", lambda self, steps=2: release.wait(timeout=60))
    with make_client(warmup=True) as client:
        assert client.get("/healthz").status_code == 200  # alive, answering
        assert client.get("/readyz").status_code == 503
        refused = client.post("/generate", json={"prompt": "a red circle", "steps": 2})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert refused.headers["retry-after-ms"] == "5000"
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready 30 s after the warm-up ended"
            time.sleep(0.05)
        assert client.post("/generate", json={"prompt": "a red circle", "steps": 2}).status_code == 200


def test_the_server_listens_while_the_bundle_loads(tiny_bundle, pipeline, monkeypatch):
    """Without a pipeline given, the app loads its bundle in the background: alive at once, not ready (and
    refusing work with 503) until the bundle is loaded."""
    from fastapi.testclient import TestClient

    from aptp.pipeline import RoutedPipeline

    release = threading.Event()

    def slow_load(*args, **kwargs):
        release.wait(timeout=60)
        return pipeline

    monkeypatch.setattr(RoutedPipeline, "load", slow_load)
    app = create_app(server_settings(tiny_bundle))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").json() == {"status": "loading"}
        assert "aptp_ready 0.0" in client.get("/metrics").text
        for method, path, body in (("post", "/generate", {"prompt": "a red circle"}), ("get", "/v1/codes", None)):
            refused = getattr(client, method)(path, **({"json": body} if body else {}))
            assert refused.status_code == 503 and "Retry-After" in refused.headers, (path, refused.text)
        release.set()
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=30)
        assert client.post("/generate", json={"prompt": "a red circle", "steps": 2}).status_code == 200


def test_a_bundle_that_cannot_be_loaded_is_reported_and_stops_the_server(tiny_bundle, tmp_path):
    """A manifest whose stated cost the experts do not have: the server, listening already, reports the field on
    /readyz and asks to stop (`aptp serve` then exits 2 with the message)."""
    import shutil

    from fastapi.testclient import TestClient

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["teacher_macs"] = 10**12
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    app = create_app(server_settings(bundle))
    stopped = []
    app.state.aptp.on_load_failure = stopped.append
    with TestClient(app) as client:
        wait_for(lambda: stopped, timeout=60)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "teacher_macs" in ready.json()["error"] and "manifest.json" in stopped[0]
        assert client.post("/generate", json={"prompt": "a red circle"}).status_code == 503


def test_a_full_server_refuses_at_the_door_before_reading_the_body(make_client, pipeline):
    """When no request could be admitted, a generation request is refused on its headers: even a body that is not
    JSON gets the 429 (with Retry-After), in each API family's shape."""
    encoded = pipeline.encode(["a red circle"])
    with make_client(batching="request", max_queue_size=1, max_batch_size=8, max_wait_ms=5000) as client:
        _fill_every_queue(client, encoded)
        headers = {"Content-Type": "application/json"}
        native = client.post("/generate", content=b"{not json", headers=headers)
        assert native.status_code == 429 and int(native.headers["Retry-After"]) >= 1
        assert "full" in native.json()["detail"]
        openai = client.post("/v1/images/generations", content=b"{not json", headers=headers)
        assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error"
        assert client.post("/route", json={"prompts": ["a red circle"]}).status_code == 200  # not a generation


def test_the_door_leaves_requests_without_a_valid_key_to_the_key_check(make_client, pipeline):
    encoded = pipeline.encode(["a red circle"])
    with make_client(
        batching="request", max_queue_size=1, max_batch_size=8, max_wait_ms=5000, api_keys=["k1"]
    ) as client:
        _fill_every_queue(client, encoded)
        assert client.post("/generate", json={"prompt": "a red circle"}).status_code == 401
        keyed = client.post("/generate", json={"prompt": "a red circle"}, headers={"Authorization": "Bearer k1"})
        assert keyed.status_code == 429


def test_a_whole_float_is_an_integer_as_json_schema_says(client):
    """`2.0` is an integer to JSON Schema (and so to the OpenAPI contract): taken as 2, where "2" and true are not."""
    response = client.post("/generate", json={"prompt": "a red circle", "num_images": 2.0, "seed": 5.0, "steps": 2})
    assert response.status_code == 200, response.text
    assert response.json()["report"]["seeds"] == [5, 6]
