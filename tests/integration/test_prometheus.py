"""A real Prometheus (Debian's) scrapes a real worker with iotflow's rules loaded."""
from __future__ import annotations

import asyncio
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml

from iotflow.stack.base import free_loopback_port
from iotflow.testing import http_get_json, produce_telemetry, register, wait_for
from tests.unit.test_dashboards import dashboard_expressions

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "monitoring/prometheus/prometheus.yml"


def query(base: str, expr: str) -> list[dict]:
    status, body = http_get_json(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert status == 200 and body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.timeout(300)
def test_prometheus_scrapes_a_worker_and_evaluates_every_rule(settings, start_worker, run_id, tmp_path):
    devices = [f"prom-{run_id}-{i}" for i in range(5)]
    asyncio.run(register(settings, devices))
    worker = start_worker()
    worker.wait_ready()
    worker.wait_registered(devices)
    asyncio.run(produce_telemetry(settings, devices, per_device=20))

    config = yaml.safe_load(CONFIG.read_text())  # the shipped file, pointed at this test's worker
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(CONFIG.parent / path) for path in config["rule_files"]]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{worker.web_port}"]
    for group in config.get("rule_files", []):
        assert Path(group).is_file(), group
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_loopback_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def target_up() -> bool:
            try:
                status, body = http_get_json(f"{base}/api/v1/targets")
            except OSError:  # not listening yet
                return False
            targets = body["data"]["activeTargets"] if status == 200 else []
            return bool(targets) and all(t["health"] == "up" for t in targets)

        assert wait_for(target_up, timeout=60), (tmp_path / "prometheus.log").read_text()[-2000:]
        stored = wait_for(lambda: query(base, 'iotflow_ingest_messages_total{outcome="new"}'), timeout=60)
        assert stored and float(stored[0]["value"][1]) >= 100
        assert query(base, 'sum(iotflow_http_requests_total{route="/api/v1/devices/{device_id}/state"})')
        assert query(base, "iotflow_ingest_e2e_latency_seconds_count")

        def rules_evaluated() -> list[dict] | None:
            status, body = http_get_json(f"{base}/api/v1/rules")
            rules = [r for g in body["data"]["groups"] for r in g["rules"]] if status == 200 else []
            return rules if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules) else None

        rules = wait_for(rules_evaluated, timeout=60)
        assert rules, "the rules were not all evaluated"
        assert [r["name"] for r in rules if r["health"] != "ok"] == [], [r.get("lastError") for r in rules]
        # The storage SLO's ratio from this worker's messages while Prometheus watches: none late.
        asyncio.run(produce_telemetry(settings, devices, per_device=20, first_seq=20))

        def ratio() -> float | None:
            found = query(base, "iotflow:slo_storage_latency:error_ratio_rate5m")
            value = float(found[0]["value"][1]) if found else float("nan")
            return None if value != value else value  # NaN: no messages in the window yet

        assert wait_for(lambda: ratio() is not None, timeout=60)
        assert ratio() == 0.0
        # Every dashboard expression is valid PromQL for this Prometheus (Grafana's range variable
        # replaced), and those on the ingest path have data.
        for uid, expressions in dashboard_expressions().items():
            for expr in expressions:
                status, body = http_get_json(
                    f"{base}/api/v1/query?query={urllib.parse.quote(expr.replace('$__rate_interval', '1m'))}")
                assert status == 200 and body["status"] == "success", (uid, expr, body)
        assert query(base, "sum by (outcome) (rate(iotflow_ingest_messages_total[1m]))")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()
