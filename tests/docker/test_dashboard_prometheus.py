"""The Grafana dashboard's queries, evaluated by a real Prometheus scraping a real `aptp serve` on loopback.

`test_deploy_files.py` checks the queries against the metric names the server exports; this checks that
Prometheus itself evaluates every one of them (syntax, label matching, `rate` over scraped counters) and that the
readiness panel tells a server that is down from one that is ready. It needs the `prometheus` binary (Debian's
package: `apt-get install prometheus`) and is skipped without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.docker.dashboard import (
    METRIC,
    SCRAPE_INTERVAL_S,
    empty_panels,
    instant,
    last_scrape,
    readiness_expr,
    running_prometheus,
)
from tests.helpers import free_port, stop_process, wait_for, wait_until_ready

pytestmark = pytest.mark.slow


def test_every_panel_query_evaluates_and_a_stopped_server_reads_down(dashboard, prometheus_binary, tmp_path: Path):
    server_port = free_port()
    target = f"127.0.0.1:{server_port}"
    url = f"http://{target}"
    scrape = f"  - job_name: aptp\n    static_configs:\n      - targets: ['{target}']\n"
    env = {**os.environ, "APTP_PORT": str(server_port), "APTP_DEFAULT_STEPS": "2", "APTP_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "aptp.cli.main", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        with running_prometheus(prometheus_binary, scrape, tmp_path, free_port()) as prometheus:
            wait_until_ready(server, url)
            # one event of each kind the panels show: images of several codes, a refused request, routing
            prompts = ["a red circle", "three blue squares in a row on a grey background", "the digit 7 in green"]
            for seed, prompt in enumerate(prompts):
                response = httpx.post(f"{url}/generate", json={"prompt": prompt, "seed": seed}, timeout=120)
                assert response.status_code == 200
            assert httpx.post(f"{url}/generate", json={"prompt": " "}, timeout=10).status_code == 422
            exported = set(METRIC.findall(httpx.get(f"{url}/metrics", timeout=10).text))
            # two scrapes after the traffic, so every rate() window holds the change
            began = time.time()
            wait_for(lambda: last_scrape(prometheus, target) > began + SCRAPE_INTERVAL_S, timeout=30)
            empty = empty_panels(prometheus, dashboard, exported)
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
        stop_process(server)
