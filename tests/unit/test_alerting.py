"""The Prometheus rules: valid for promtool, unit-tested by promtool, and built only from metrics
iotflow exports (a renamed metric would silently never alert)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import iotflow.metrics  # noqa: F401 - registers every metric

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring/prometheus/rules/iotflow.rules.yml"
RULE_TESTS = ROOT / "monitoring/prometheus/tests/iotflow.test.yml"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_series_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("iotflow_"):
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_pass_their_promtool_unit_tests():
    done = subprocess.run(["promtool", "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_metric_a_rule_reads_is_one_iotflow_exports():
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    used = {name for rule in rules for name in re.findall(r"\biotflow_[a-z0-9_]+", rule["expr"])}
    assert used, "no rule reads an iotflow metric"
    assert used <= exported_series_names(), f"not exported: {sorted(used - exported_series_names())}"
    recorded = {rule["record"] for rule in rules if "record" in rule}
    read = {name for rule in rules for name in re.findall(r"\biotflow:[a-z0-9_:]+", rule["expr"])}
    assert read <= recorded, f"read but never recorded: {sorted(read - recorded)}"


def test_every_alert_names_a_severity_and_a_runbook_section_that_exists():
    operations = (ROOT / "docs/operations.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("# ").strip().lower()).replace(" ", "-")
               for line in operations.splitlines() if line.startswith("#")}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
                page, _, anchor = rule["annotations"]["runbook"].partition("#")
                assert page == "docs/operations.md" and anchor in anchors, (rule["alert"], anchor)


def test_every_bucket_bound_a_rule_names_is_one_the_histogram_exports():
    # prometheus_client writes bounds Go-style: le="10.0", never le="10" (a rule naming "10"
    # would match no series, and its SLO would never count a bad event).
    from prometheus_client import Histogram
    from prometheus_client.utils import floatToGoString

    bounds = {metric._name: {floatToGoString(b) for b in metric._upper_bounds}
              for metric in vars(iotflow.metrics).values() if isinstance(metric, Histogram)}
    named = re.findall(r"\b(iotflow_[a-z0-9_]+)_bucket\{[^}]*le=\"([^\"]+)\"", RULES.read_text())
    assert named
    for histogram, bound in named:
        assert bound in bounds[histogram], f"{histogram} has no bucket le={bound!r}: {sorted(bounds[histogram])}"
