"""The Grafana dashboards read only what exists: metrics iotflow exports, rules it records, and
Prometheus's own ``up``. (tests/integration/test_prometheus.py runs every expression on a real
Prometheus for its syntax.)"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.unit.test_alerting import RULES, exported_series_names

DASHBOARDS = Path(__file__).resolve().parents[2] / "monitoring/grafana/dashboards"


def dashboard_expressions() -> dict[str, list[str]]:
    found = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        found[board["uid"]] = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    return found


def test_there_are_the_system_and_the_pipeline_dashboards_and_every_panel_queries_something():
    expressions = dashboard_expressions()
    assert {"iotflow-system", "iotflow-pipeline"} <= set(expressions)
    for path in DASHBOARDS.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_every_metric_a_dashboard_reads_exists():
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    known = exported_series_names() | recorded | {"up"}
    for uid, expressions in dashboard_expressions().items():
        for expr in expressions:
            without_labels = re.sub(r"\{[^}]*\}", "", re.sub(r"\[[^\]]*\]", "", expr))
            names = set(re.findall(r"\biotflow[_:][a-z0-9_:]+", without_labels))
            if "up{" in expr:
                names.add("up")
            assert names, f"{uid}: {expr} reads no metric"
            assert names <= known, f"{uid}: {expr} reads {sorted(names - known)}, which nothing exports or records"


def test_system_health_colours_each_component_red_yellow_green():
    board = json.loads((DASHBOARDS / "iotflow-system.json").read_text())
    stats = [p for p in board["panels"] if p["type"] == "stat"]
    assert len(stats) >= 6
    for panel in stats:
        colours = {s["color"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]}
        assert "green" in colours and colours & {"yellow", "red"}, panel["title"]
