"""Every endpoint against a real small bundle: answers, reports, errors."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from tests.server.conftest import NUM_CODES


def decode_png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_generate_returns_images_and_a_consistent_report(client, pipeline):
    response = client.post("/generate", json={"prompt": "a red circle", "num_images": 2, "seed": 11, "steps": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [image["seed"] for image in body["images"]] == [11, 12]
    for image in body["images"]:
        assert decode_png(image["b64_png"]).shape == (32, 32, 3)
    report = body["report"]
    assert 0 <= report["code"] < NUM_CODES
    assert report["macs_per_call"] == pipeline.codes[report["code"]].macs
    assert report["teacher_macs_per_call"] == pipeline.teacher_macs
    assert report["unet_calls_per_image"] == 2 * 3  # guided: both branches per step
    assert report["text_adapter_macs"] == 0  # the tiny teacher reads the encoder's states directly
    assert report["total_macs"] == report["macs_per_call"] * 6 * 2
    assert report["steps"] == 3 and report["guidance_scale"] == pipeline.default_guidance_scale
    assert report["total_seconds"] >= report["queue_seconds"] >= 0
    assert report["compute_seconds"] > 0 and report["batch_images"] >= 2
    assert report["router_seconds"] > report["encode_seconds"] > 0  # encoding, then choosing the code


def test_guidance_one_runs_a_single_branch(client):
    report = client.post("/generate", json={"prompt": "a red circle", "guidance_scale": 1.0}).json()["report"]
    assert report["unet_calls_per_image"] == 2  # default_steps=2, no unconditional branch


def test_the_generated_code_is_the_routed_code(client):
    prompts = ["a red circle", "three blue squares in a row on a grey background", "the letter K in green"]
    routes = client.post("/route", json={"prompts": prompts}).json()["routes"]
    for prompt, decision in zip(prompts, routes, strict=True):
        report = client.post("/generate", json={"prompt": prompt, "seed": 0}).json()["report"]
        assert report["code"] == decision["code"]
        assert report["router_score"] == decision["score"]


def test_route_explains_codes_and_does_not_depend_on_the_batch(client, pipeline):
    prompts = ["a red circle", "a big yellow triangle at the top left", "the digit 7", "two crosses"]
    together = client.post("/route", json={"prompts": prompts})
    assert together.status_code == 200
    body = together.json()
    assert body["teacher_macs_per_call"] == pipeline.teacher_macs
    for index, prompt in enumerate(prompts):
        alone = client.post("/route", json={"prompts": [prompt]}).json()["routes"][0]
        decision = body["routes"][index]
        assert decision["prompt_index"] == index
        assert (alone["code"], alone["score"]) == (decision["code"], decision["score"])
        assert decision["macs_per_call"] == pipeline.codes[decision["code"]].macs
        assert abs(decision["macs_ratio"] - decision["macs_per_call"] / pipeline.teacher_macs) < 1e-12


def test_codes_lists_every_code_with_its_cost(client, pipeline):
    client.post("/generate", json={"prompt": "a red circle"})
    body = client.get("/v1/codes").json()
    assert body["source"] == "bundle" and body["resolution"] == 32
    assert [c["code"] for c in body["codes"]] == list(range(NUM_CODES))
    for code, info in zip(body["codes"], pipeline.codes, strict=True):
        assert (code["macs_per_call"], code["params"], code["training_share"]) == (
            info.macs,
            info.params,
            info.training_share,
        )
    assert body["codes"][0]["macs_per_call"] > body["codes"][1]["macs_per_call"]  # keeps 1.0 vs 0.5
    observed = [c["completed_batches_avg_seconds"] for c in body["codes"]]
    assert any(seconds is not None and seconds > 0 for seconds in observed)


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_same_seed_same_image_alone_or_batched(make_client):
    prompt = "a green square in the middle"
    # A long max_wait holds the first requests until the batch is full, so all four run as one batch.
    with make_client(batching="request", max_batch_size=4, max_wait_ms=5000) as client:
        payloads = [{"prompt": prompt, "seed": seed, "steps": 3} for seed in (5, 6, 7, 8)]
        with ThreadPoolExecutor(4) as pool:
            batched = list(pool.map(lambda p: client.post("/generate", json=p).json(), payloads))
        assert all(body["report"]["batch_images"] == 4 for body in batched)
    with make_client(max_batch_size=1) as client:
        alone = client.post("/generate", json={"prompt": prompt, "seed": 7, "steps": 3}).json()
    assert alone["report"]["batch_images"] == 1
    together = decode_png(batched[2]["images"][0]["b64_png"]).astype(int)
    single = decode_png(alone["images"][0]["b64_png"]).astype(int)
    # Float sums may differ in the last bit between batch shapes; a pixel may round to the neighbouring level.
    assert np.abs(together - single).max() <= 1
    assert (together != single).mean() < 0.01
    other = decode_png(batched[3]["images"][0]["b64_png"]).astype(int)
    assert np.abs(other - single).max() > 1  # a different seed is a different image


def test_requests_of_one_code_arriving_together_share_a_batch(make_client):
    with make_client(batching="request", max_batch_size=3, max_wait_ms=5000) as client:
        with ThreadPoolExecutor(3) as pool:
            bodies = list(
                pool.map(lambda s: client.post("/generate", json={"prompt": "a red circle", "seed": s}), [1, 2, 3])
            )
        assert all(b.status_code == 200 for b in bodies)
        code = bodies[0].json()["report"]["code"]
        metrics = client.get("/metrics").text
    assert f'aptp_batch_size_count{{code="{code}"}} 1.0' in metrics
    assert f'aptp_batch_size_sum{{code="{code}"}} 3.0' in metrics
    assert f'aptp_images_total{{code="{code}"}} 3.0' in metrics


def test_negative_prompt_changes_the_image_and_is_echoed(client):
    base = {"prompt": "a red circle", "seed": 3, "steps": 2}
    plain = client.post("/generate", json=base).json()
    negative = client.post("/generate", json={**base, "negative_prompt": "blue"}).json()
    assert plain["report"]["code"] == negative["report"]["code"]
    assert not np.array_equal(decode_png(plain["images"][0]["b64_png"]), decode_png(negative["images"][0]["b64_png"]))
    openai = client.post("/v1/images/generations", json={"prompt": "a red circle", "negative_prompt": "blue"}).json()
    assert openai["negative_prompt"] == "blue"


def test_random_seeds_are_reported(client):
    first = client.post("/generate", json={"prompt": "a red circle", "num_images": 2}).json()
    seeds = [image["seed"] for image in first["images"]]
    assert seeds[1] == seeds[0] + 1 and first["report"]["seeds"] == seeds
    again = client.post("/generate", json={"prompt": "a red circle", "seed": seeds[0]}).json()
    # A reported seed gives its image back (to one intensity level: the first call ran as a batch of two).
    repeated = decode_png(again["images"][0]["b64_png"]).astype(int)
    assert np.abs(repeated - decode_png(first["images"][0]["b64_png"]).astype(int)).max() <= 1
    assert np.abs(repeated - decode_png(first["images"][1]["b64_png"]).astype(int)).max() > 1


def test_openapi_schema_lists_the_api(client):
    schema = client.get("/openapi.json").json()
    for path in ("/generate", "/v1/images/generations", "/route", "/v1/codes", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"], path
    generate = schema["paths"]["/generate"]["post"]
    assert generate["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("GenerateRequest")
    # Without API keys there is nothing to authenticate, and the document says so (issue 20: it used to declare
    # bearer auth regardless); with keys it declares it (test_the_openapi_document_states_...).
    assert "securitySchemes" not in schema.get("components", {})
    request_fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert set(request_fields) == {
        "prompt",
        "negative_prompt",
        "num_images",
        "steps",
        "guidance_scale",
        "seed",
        "max_macs_ratio",
        "quality",
    }


def test_a_model_with_a_text_adapter_reports_its_cost(tmp_path):
    """The adapter runs once per prompt (here the prompt and the negative prompt), not once per U-Net call."""
    from fastapi.testclient import TestClient

    from aptp.pipeline import RoutedPipeline
    from server.app import create_app
    from tests.helpers import save_tiny_teacher
    from tests.server.conftest import server_settings
    from training.export import random_bundle

    # Its U-Nets also take the adapter's prompt map, of the prompt and of the negative prompt.
    teacher = save_tiny_teacher(tmp_path / "teacher", adapter_width=16, summary_tokens=5, map_channels=4)
    bundle = random_bundle(teacher, tmp_path / "bundle", num_codes=2, keeps=[1.0, 0.5])
    pipeline = RoutedPipeline.load(bundle)
    per_prompt = pipeline.encoder.adapter.macs(pipeline.encoder.config.max_length)
    with TestClient(create_app(server_settings(bundle), pipeline)) as client:
        assert client.get("/v1/codes").json()["text_adapter_macs_per_prompt"] == per_prompt > 0
        body = {"prompt": "a red circle", "negative_prompt": "a blue square", "steps": 2}
        report = client.post("/generate", json=body).json()["report"]
    assert report["text_adapter_macs"] == 2 * per_prompt
    assert report["total_macs"] == report["macs_per_call"] * report["unet_calls_per_image"] + 2 * per_prompt


def test_the_openapi_document_states_the_limits_errors_and_auth_the_server_keeps(make_client):
    with make_client(max_steps=40, max_images_per_request=3, max_prompt_chars=500) as client:
        open_doc = client.get("/openapi.json").json()
    with make_client(api_keys=["secret"]) as client:
        keyed_doc = client.get("/openapi.json").json()
    request = open_doc["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 40} in [
        {k: v for k, v in b.items() if k in ("type", "minimum", "maximum")} for b in request["steps"]["anyOf"]
    ]
    assert request["num_images"]["maximum"] == 3 and request["prompt"]["maxLength"] == 500
    answers = set(open_doc["paths"]["/generate"]["post"]["responses"])
    assert {"200", "413", "422", "429", "500", "503", "504"} <= answers and "401" not in answers
    assert {"400", "413", "429"} <= set(open_doc["paths"]["/v1/images/generations"]["post"]["responses"])
    for path in ("/generate", "/v1/images/generations"):
        for status in ("429", "503"):
            headers = open_doc["paths"][path]["post"]["responses"][status]["headers"]
            assert set(headers) == {"Retry-After", "retry-after-ms"}
    assert "securitySchemes" not in open_doc.get("components", {})  # no keys configured: nothing to send
    assert "securitySchemes" in keyed_doc["components"]
    assert "401" in keyed_doc["paths"]["/generate"]["post"]["responses"]


def test_step_level_batching_serves_the_images_batch_at_once_serving_serves(make_client):
    """The same requests, served with requests joining and leaving running batches between steps, get the images
    whole-batch serving gives them (to float rounding), each with the U-Net calls it ran."""
    payloads = [
        {"prompt": "a green square in the middle", "seed": seed, "steps": steps}
        for seed, steps in ((1, 2), (2, 4), (3, 3))
    ]
    with make_client(max_batch_size=4, batching="step") as client, ThreadPoolExecutor(3) as pool:
        stepped = list(pool.map(lambda p: client.post("/generate", json=p), payloads))
    with make_client(max_batch_size=1) as client:
        whole = [client.post("/generate", json=p) for p in payloads]
    for step_level, batch_at_once, payload in zip(stepped, whole, payloads, strict=True):
        assert step_level.status_code == batch_at_once.status_code == 200
        report = step_level.json()["report"]
        assert report["steps"] == payload["steps"] and report["unet_calls_per_image"] == 2 * payload["steps"]
        ours = decode_png(step_level.json()["images"][0]["b64_png"]).astype(int)
        theirs = decode_png(batch_at_once.json()["images"][0]["b64_png"]).astype(int)
        assert np.abs(ours - theirs).max() <= 1


def test_the_api_page_works_offline_and_is_open_without_a_key(make_client):
    """`/docs` loads Swagger UI from the server itself, never a CDN, so it works where the server has no internet
    access; like `/openapi.json` it needs no API key."""
    import re

    with make_client(api_keys=["secret"]) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(source.startswith("/docs/assets/") for source in sources), sources
        assert "://" not in page.text  # no absolute URL anywhere on the page
        for source in sources:
            asset = client.get(source)
            assert asset.status_code == 200 and len(asset.content) > 0, source
        assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN: not served
        assert client.post("/generate", json={"prompt": "a red circle"}).status_code == 401


def test_a_wait_is_advised_in_whole_seconds_rounded_up_and_in_milliseconds():
    from server.api.errors import retry_headers

    assert retry_headers(6.3) == {"Retry-After": "7", "retry-after-ms": "6300"}
    assert retry_headers(1.0) == {"Retry-After": "1", "retry-after-ms": "1000"}
    assert retry_headers(0.2) == {"Retry-After": "1", "retry-after-ms": "200"}  # never "0": retry at once
