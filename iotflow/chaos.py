"""``iotflow chaos [SCENARIO…]``: the fault-injection scenarios against the real local stack, as a
command and a table.

Each scenario is a test in ``tests/reliability/`` (run from a checkout, with the local stack up):
it loads the stack, injects its fault with real process control (SIGKILL, SIGTERM, stopping a
service), asserts what must hold, and records its figures — messages sent, stored, lost,
duplicated; API requests made and failed; recovery time — through the ``chaos`` fixture into the
report file this command reads. The table is printed and written to ``docs/reliability.md`` with
the command that produced it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from xml.etree import ElementTree
from datetime import UTC, datetime
from pathlib import Path

SCENARIOS: dict[str, str] = {
    "worker-kill": "tests/reliability/test_worker_crash.py::test_three_kill_9s_during_a_run_lose_nothing_and_store_nothing_twice",
    "worker-kill-exactly-once": "tests/reliability/test_worker_crash.py::test_kill_9s_of_an_exactly_once_worker_lose_nothing_and_store_nothing_twice",
    "postgres-stop": "tests/reliability/test_bridge_and_database_faults.py::test_the_database_stopped_for_30_seconds_costs_nothing_and_memory_stays_bounded",
    "bridge-kill": "tests/reliability/test_bridge_and_database_faults.py::test_a_bridge_killed_mid_stream_loses_nothing",
    "kafka-restart": "tests/reliability/test_kafka_broker_restart.py::test_a_kafka_broker_restart_under_load_loses_nothing",
    "kafka-broker-kill": "tests/reliability/test_kafka_cluster.py::test_a_broker_of_three_killed_under_load_loses_nothing_and_stalls_only_for_the_election",
    "thundering-herd": "tests/reliability/test_thundering_herd.py::test_five_thousand_devices_reconnecting_at_once_lose_nothing",
    "mosquitto-restart": "tests/reliability/test_mqtt_broker_restart.py::test_a_broker_restart_under_load_loses_nothing",
    "hostile-input-storm": "tests/reliability/test_hostile_input.py::test_a_storm_of_hostile_payloads_ends_in_the_dlq_or_a_4xx_and_valid_traffic_is_untouched",
    "registration-storm": "tests/reliability/test_registration_storm.py::test_five_thousand_devices_registering_while_they_send_lose_nothing_to_the_dlq",
    "duplicate-storm": "tests/reliability/test_duplicate_storm.py::test_thirty_percent_duplicates_store_no_row_twice",
    "postgres-failover": "tests/reliability/test_postgres_failover.py::test_the_primary_killed_and_its_replica_promoted_loses_no_committed_message",
    "redis-stop": "tests/reliability/test_redis_outage.py::test_reads_survive_a_redis_outage_and_use_the_cache_again_after",
    "redis-sentinel-failover": "tests/reliability/test_redis_sentinel.py::test_the_worker_follows_a_promoted_replica_without_a_failed_request",
    "worker-sigterm": "tests/reliability/test_graceful_shutdown.py::test_sigterm_under_load_fails_no_request_and_loses_no_message",
    "rolling-restart": "tests/reliability/test_rebalances.py::test_a_rolling_restart_of_two_workers_fails_no_request_and_loses_nothing",
    "worker-join-leave": "tests/reliability/test_rebalances.py::test_a_third_worker_joining_and_leaving_loses_nothing_and_views_answer_from_the_new_owners",
    "rollout-leader-kill": "tests/reliability/test_rollout_leader_kill.py::test_the_leader_killed_mid_rollout_the_other_worker_finishes_it_without_a_second_command",
    "rollout-under-faults": "tests/reliability/test_rollout_under_faults.py::test_a_thousand_device_rollout_completes_through_a_leader_kill_and_a_bridge_kill",
}
COLUMNS = ("sent", "stored", "lost", "duplicated", "dlq", "requests", "failed_requests", "recovery_s")


def run(root: Path, names: list[str]) -> tuple[int, list[dict[str, object]]]:
    """Run the scenarios (all by default) with pytest; return its exit status and, per scenario,
    its figures and whether it held (its test passed)."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    chosen = names or list(SCENARIOS)
    with tempfile.TemporaryDirectory(prefix="iotflow-chaos-") as work:
        report, junit = Path(work) / "figures.jsonl", Path(work) / "junit.xml"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
             *(SCENARIOS[n] for n in chosen)],
            cwd=root, env={**os.environ, "PYTEST_IOTFLOW_CHAOS_REPORT": str(report)}, check=False)
        figures = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        held = _outcomes(junit)
    by_test = {f["test"]: f for f in figures}
    rows = []
    for name in chosen:
        test = SCENARIOS[name]
        rows.append({"scenario": name, **by_test.get(test, {"fault": "(no figures: it failed before them)"}),
                     "passed": held.get(test.rsplit("::", 1)[1], False)})
    return done.returncode, rows


def _outcomes(junit: Path) -> dict[str, bool]:
    """Test name → passed, from pytest's JUnit XML."""
    if not junit.exists():
        return {}
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    return {case.get("name", ""): not any(child.tag in ("failure", "error", "skipped") for child in case)
            for case in cases}


def table(rows: list[dict[str, object]]) -> str:
    header = ["scenario", "fault", *COLUMNS, "held"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [str(row.get("scenario")), str(row.get("fault", ""))]
        cells += ["" if row.get(c) is None else str(row[c]) for c in COLUMNS]
        cells.append("yes" if row["passed"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extras(rows: list[dict[str, object]]) -> str:
    """The figures a scenario recorded beyond the table's columns, one line per scenario."""
    known = {"scenario", "test", "fault", "passed", *COLUMNS}
    lines = []
    for row in rows:
        more = {k: v for k, v in row.items() if k not in known}
        if more:
            lines.append(f"- {row['scenario']}: " + ", ".join(f"{k} {v}" for k, v in more.items()))
    return "\n".join(lines)


def write_doc(root: Path, command: str, rows: list[dict[str, object]]) -> Path:
    path = root / "docs" / "reliability.md"
    path.write_text(
        "# Reliability: faults injected into the real stack, and what they cost\n\n"
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, on the local stack of this "
        "2-core machine (iotflow/chaos.py; each scenario is a test in `tests/reliability/`, which CI "
        "runs too). *sent*/*stored*/*lost*/*duplicated* count distinct messages in the database; *dlq* "
        "the records in the scenario's dead-letter topic (the hostile-input storm's payloads, for one); "
        "*requests*/*failed_requests* are API calls made during the fault; *recovery_s* is the time "
        "from the end of the fault to everything stored (worker-sigterm: from SIGTERM to the clean "
        "exit; redis-sentinel-failover: from the kill to the promotion; postgres-failover: from the "
        "promotion to everything stored; thundering-herd and kafka-broker-kill: from the broker's "
        "return, resp. the kill, to everything stored). Figures beyond the columns are under the table.\n\n"
        + table(rows) + "\n" + (f"\n{extras(rows)}\n" if extras(rows) else ""))
    return path
