"""The server as a Ray Serve application (`server.cluster`), on a local Ray cluster on loopback: two expert
replicas of the shipped bundle, requests of several codes, batches that never mix codes, a 429 when the cluster's
places are held, a replica killed under load with every request answered, and recovery.

Heavy (a Ray cluster and three copies of the bundle on two cores): slow-marked. Needs `pip install '.[ray]'`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install '.[ray]'")

from ray import serve  # noqa: E402

from aptp.formats.kinds import DEFAULT_BUNDLE  # noqa: E402
from server.cluster import EXPERTS, NAMESPACE, TARGETS_ACTOR, application, expert_options  # noqa: E402
from server.settings import ClusterSettings, Settings  # noqa: E402
from tests.docker.dashboard import (  # noqa: E402
    METRIC,
    SCRAPE_INTERVAL_S,
    answers,
    empty_panels,
    instant,
    last_scrape,
    readiness_expr,
    running_prometheus,
)
from tests.helpers import free_port, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Prompts the shipped router sends to different codes (checked below, not assumed).
PROMPTS = [
    "a red circle",
    "three blue squares in a row on a grey background",
    "the digit 7 in green",
    "a big yellow triangle at the top left",
    "two crosses",
    "a small purple star below a green heart",
]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with the application deployed; yields its URL."""
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(
            bundle=REPO / DEFAULT_BUNDLE,
            default_steps=2,
            max_queue_size=2,
            max_batch_size=4,
            max_wait_ms=200,
            threads=1,
            drain_timeout_s=30,
        )
        layout = ClusterSettings(expert_replicas=2, cpus_per_replica=1)
        serve.run(application(settings, layout), name="aptp", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{url}/readyz"), timeout=180)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _generate(url: str, prompt: str, seed: int, **extra) -> httpx.Response:
    return httpx.post(f"{url}/generate", json={"prompt": prompt, "seed": seed, **extra}, timeout=300)


def _expert_replicas() -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return [actor["name"] for actor in names if EXPERTS in actor["name"] and "REPLICA" in actor["name"]]


def test_the_cluster_serves_several_codes_and_its_batches_never_mix_them(cluster):
    routes = httpx.post(f"{cluster}/route", json={"prompts": PROMPTS}, timeout=60).json()["routes"]
    codes = [route["code"] for route in routes]
    assert len(set(codes)) >= 2, f"the shipped router sent every prompt to one code: {codes}"
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(lambda i: _generate(cluster, PROMPTS[i], i), range(len(PROMPTS))))
    assert [r.status_code for r in responses] == [200] * len(PROMPTS), [r.text[:200] for r in responses]
    reports = [r.json()["report"] for r in responses]
    assert [report["code"] for report in reports] == codes  # served by the code the router chose
    for report in reports:
        same_code = codes.count(report["code"])
        assert 1 <= report["batch_images"] <= same_code, "a batch held images of another code"
        assert report["queue_seconds"] >= 0 and report["compute_seconds"] > 0

    # the replicas' own metrics, found the way Prometheus finds them
    (group,) = httpx.get(f"{cluster}/metrics/targets", timeout=10).json()
    assert len(group["targets"]) == 2
    batches: dict[str, float] = {}
    for target in group["targets"]:
        for line in httpx.get(f"http://{target}/metrics", timeout=10).text.splitlines():
            if line.startswith("aptp_batch_size_count{"):
                code = line.split('code="')[1].split('"')[0]
                batches[code] = batches.get(code, 0) + float(line.split()[-1])
    assert {str(code) for code in codes} <= {code for code, n in batches.items() if n > 0}


def test_the_openai_client_gets_images_through_the_cluster(cluster):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a red circle", n=2, extra_body={"seed": 3, "steps": 2})
    assert len(result.data) == 2 and all(image.b64_json for image in result.data)


def test_a_full_cluster_answers_429_with_retry_after_and_loses_nothing(cluster):
    # places: 2 replicas x (2 queued per code x 4 codes + a batch of 4) = 24; 64 at once cannot all be held
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda i: _generate(cluster, PROMPTS[i % len(PROMPTS)], 100 + i), range(64)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and 200 in statuses
    assert all("Retry-After" in r.headers for r in responses if r.status_code == 429)


def _busy(target: str) -> bool:
    """Whether the expert replica serving metrics at `target` holds a request (waiting or in a running batch)."""
    lines = httpx.get(f"http://{target}/metrics", timeout=10).text.splitlines()
    held = ("aptp_queue_depth{", "aptp_running_batches ")
    return sum(float(line.split()[-1]) for line in lines if line.startswith(held)) > 0


def test_a_replica_killed_under_load_loses_no_request_and_is_replaced(cluster):
    before = _expert_replicas()
    assert len(before) == 2, before
    targets = ray.get(ray.get_actor(TARGETS_ACTOR, namespace=NAMESPACE).by_replica.remote())
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(_generate, cluster, PROMPTS[i % len(PROMPTS)], 200 + i, steps=20) for i in range(20)]
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            victim = next((name for name in before if _busy(targets[name.rsplit("#", 1)[-1]])), None)
        assert victim is not None, "no replica ever held a request"
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)  # with requests in it
        responses = [future.result() for future in futures]
    statuses = [r.status_code for r in responses]
    # each request answered: an image (served, or sent again to the live replica) or a clear 503
    assert set(statuses) <= {200, 503}, [r.text[:200] for r in responses]
    assert statuses.count(200) >= 1
    assert all("replica" in r.json()["detail"] for r in responses if r.status_code == 503)

    def replaced() -> bool:
        status = serve.status().applications["aptp"].deployments[EXPERTS]
        return status.status == "HEALTHY" and len(_expert_replicas()) == 2 and victim not in _expert_replicas()

    wait_for(replaced, timeout=180)
    assert _generate(cluster, "a red circle", 7).status_code == 200
    (group,) = httpx.get(f"{cluster}/metrics/targets", timeout=10).json()
    assert len(group["targets"]) == 2 and targets[victim.rsplit("#", 1)[-1]] not in group["targets"]


def test_the_expert_deployment_follows_the_cluster_settings():
    layout = ClusterSettings(expert_replicas=3, max_expert_replicas=5, gpus_per_replica=0.5)
    options = expert_options(layout, Settings(max_queue_size=4, max_batch_size=8), num_codes=4)
    assert options["autoscaling_config"] == {"min_replicas": 3, "max_replicas": 5, "target_ongoing_requests": 8.0}
    assert options["ray_actor_options"]["num_gpus"] == 0.5
    assert options["max_ongoing_requests"] == 4 * 4 + 8  # queued places per code, and one batch computing
    assert "num_replicas" not in options
    fixed = expert_options(ClusterSettings(expert_replicas=2), Settings(max_batch_size={0: 2, 1: 6}), num_codes=2)
    assert fixed["num_replicas"] == 2 and fixed["max_ongoing_requests"] == 16 * 2 + 6  # the largest batch


def test_prometheus_finds_every_replica_and_the_dashboard_reads_the_cluster(
    cluster, dashboard, prometheus_binary, tmp_path
):
    """Prometheus scrapes the ingress, and the expert replicas it finds through `/metrics/targets` (HTTP service
    discovery); every panel's query evaluates, and the per-code batch panels add the replicas up."""
    ingress = cluster.removeprefix("http://")
    scrape = (
        f"  - job_name: aptp\n    static_configs:\n      - targets: ['{ingress}']\n"
        f"    http_sd_configs:\n      - url: {cluster}/metrics/targets\n        refresh_interval: 1s\n"
    )
    (group,) = httpx.get(f"{cluster}/metrics/targets", timeout=10).json()
    with running_prometheus(prometheus_binary, scrape, tmp_path, free_port()) as prometheus:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            statuses = list(pool.map(lambda i: _generate(cluster, PROMPTS[i], 300 + i).status_code, range(6)))
        assert statuses == [200] * len(PROMPTS)
        exported = set(METRIC.findall(httpx.get(f"{cluster}/metrics", timeout=10).text))
        for target in group["targets"]:
            exported |= set(METRIC.findall(httpx.get(f"http://{target}/metrics", timeout=10).text))
        began = time.time()
        instances = [ingress, *group["targets"]]
        # scraped through a whole rate window after the traffic: replicas found by discovery start late
        after = began + 6 * SCRAPE_INTERVAL_S
        wait_for(lambda: all(last_scrape(prometheus, i) > after for i in instances), timeout=60)
        up = instant(prometheus, 'up{job="aptp"}')
        assert sorted(series["metric"]["instance"] for series in up) == sorted(instances)
        empty = empty_panels(prometheus, dashboard, exported)
        assert not empty, "queries over exported series returned nothing:\n" + "\n".join(empty)
        ready = instant(prometheus, readiness_expr(dashboard))
        assert {series["metric"]["instance"]: series["value"][1] for series in ready} == dict.fromkeys(instances, "1")
        batches = instant(prometheus, "sum by (code) (aptp_batch_size_count)")
        assert {series["metric"]["code"] for series in batches} >= {"0", "2", "3"}
