"""The Grafana dashboard as the tests read it, and a real Prometheus to evaluate its queries against."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers import stop_process, wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "aptp.json"
METRIC = re.compile(r"aptp_[a-z_]+")
SCRAPE_INTERVAL_S = 1
# Grafana sets $__rate_interval to at least four scrape intervals; a little more keeps two samples in each window.
RATE_INTERVAL = "6s"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict) -> list[dict]:
    """Every panel that queries (rows only group panels), including panels nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in query_panels(dashboard) for target in panel["targets"]]


def grafana_to_promql(expr: str) -> str:
    """A panel's expression as Grafana sends it with the `code` variable at "All"."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$code", ".*")


def readiness_expr(dashboard: dict) -> str:
    (expr,) = [expr for title, expr in panel_queries(dashboard) if title == "Readiness"]
    return grafana_to_promql(expr)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def instant(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    return answer["data"]["result"]


def last_scrape(prometheus: str, instance: str) -> float:
    """Unix time of Prometheus's latest scrape of `instance` (0 before the first): the timestamp of its `up`."""
    result = instant(prometheus, f'timestamp(up{{instance="{instance}"}})')
    return float(result[0]["value"][1]) if result else 0.0


def empty_panels(prometheus: str, dashboard: dict, exported: set[str]) -> list[str]:
    """The panel queries over `exported` metric names that return nothing (queries over series never exported, such
    as a counter never incremented, may)."""
    empty = []
    for title, expr in panel_queries(dashboard):
        result = instant(prometheus, grafana_to_promql(expr))
        if not result and set(re.findall(METRIC, expr)) <= exported:
            empty.append(f"{title}: {expr}")
    return empty


@contextmanager
def running_prometheus(binary: str, scrape_configs: str, folder: Path, port: int) -> Iterator[str]:
    """Prometheus on loopback `port`, scraping every `SCRAPE_INTERVAL_S` with `scrape_configs` (the YAML list under
    `scrape_configs:`), its data in `folder`; yields its URL once it is ready."""
    config = folder / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        f"scrape_configs:\n{scrape_configs}"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/-/ready"), timeout=30)
        yield url
    finally:
        stop_process(process)
