"""The Grafana dashboard's queries, evaluated by a real Prometheus scraping a real `aptp serve` on loopback.

`test_deploy_files.py` checks the queries against the metric names the server exports; this checks that
Prometheus itself evaluates every one of them (syntax, label matching, `rate` over scraped counters) and that the
readiness panel tells a server that is down from one that is ready. It needs the `prometheus` binary (Debian's
package: `apt-get install prometheus`) and is skipped without it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.docker.dashboard import METRIC, query_panels
from tests.helpers import free_port, wait_for, wait_until_ready

SCRAPE_INTERVAL_S = 1
# Grafana sets $__rate_interval to at least four scrape intervals; a little more keeps two samples in each window.
RATE_INTERVAL = "6s"

pytestmark = pytest.mark.slow


def grafana_to_promql(expr: str) -> str:
    """A panel's expression as Grafana sends it with the `code` variable at "All"."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$code", ".*")


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in query_panels(dashboard) for target in panel["targets"]]


def readiness_expr(dashboard: dict) -> str:
    (expr,) = [expr for title, expr in panel_queries(dashboard) if title == "Readiness"]
    return grafana_to_promql(expr)


def instant(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    return answer["data"]["result"]


def last_scrape(prometheus: str, instance: str) -> float:
    """Unix time of Prometheus's latest scrape of `instance` (0 before the first): the timestamp of its `up`."""
    result = instant(prometheus, f'timestamp(up{{instance="{instance}"}})')
    return float(result[0]["value"][1]) if result else 0.0


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture()
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("needs the prometheus binary (Debian: apt-get install prometheus)")
    return binary


def test_every_panel_query_evaluates_and_a_stopped_server_reads_down(dashboard, prometheus_binary, tmp_path: Path):
    server_port, prometheus_port = free_port(), free_port()
    target = f"127.0.0.1:{server_port}"
    url, prometheus = f"http://{target}", f"http://127.0.0.1:{prometheus_port}"
    (tmp_path / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        f"scrape_configs:\n  - job_name: aptp\n    static_configs:\n      - targets: ['{target}']\n"
    )
    env = {**os.environ, "APTP_PORT": str(server_port), "APTP_DEFAULT_STEPS": "2", "APTP_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "aptp.cli.main", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    scraper = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(server, url)
        wait_for(lambda: answers(f"{prometheus}/-/ready"), timeout=30)
        # one event of each kind the panels show: images of several codes, a refused request, routing
        prompts = ["a red circle", "three blue squares in a row on a grey background", "the digit 7 in green"]
        for seed, prompt in enumerate(prompts):
            assert httpx.post(f"{url}/generate", json={"prompt": prompt, "seed": seed}, timeout=120).status_code == 200
        assert httpx.post(f"{url}/generate", json={"prompt": " "}, timeout=10).status_code == 422
        exported = set(METRIC.findall(httpx.get(f"{url}/metrics", timeout=10).text))
        # two scrapes after the traffic, so every rate() window holds the change
        began = time.time()
        wait_for(lambda: last_scrape(prometheus, target) > began + SCRAPE_INTERVAL_S, timeout=30)

        empty = []
        for title, expr in panel_queries(dashboard):
            result = instant(prometheus, grafana_to_promql(expr))
            # a query over series the server has exported must return data; others (a counter never incremented,
            # such as degraded requests) may evaluate to nothing
            if not result and set(re.findall(METRIC, expr)) <= exported:
                empty.append(f"{title}: {expr}")
        assert not empty, "queries over exported series returned nothing:\n" + "\n".join(empty)

        ready = instant(prometheus, readiness_expr(dashboard))
        assert [(series["metric"]["instance"], series["value"][1]) for series in ready] == [(target, "1")]

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        stopped = time.time()
        wait_for(lambda: last_scrape(prometheus, target) > stopped + SCRAPE_INTERVAL_S, timeout=30)
        down = instant(prometheus, readiness_expr(dashboard))
        assert [(series["metric"]["instance"], series["value"][1]) for series in down] == [(target, "-1")]
    finally:
        for process in (server, scraper):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
