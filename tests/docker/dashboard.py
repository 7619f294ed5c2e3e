"""The Grafana dashboard as the docker tests read it."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "aptp.json"
METRIC = re.compile(r"aptp_[a-z_]+")


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
