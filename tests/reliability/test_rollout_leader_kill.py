"""The leader worker killed (SIGKILL) mid-rollout: the other worker's orchestrator takes over and
finishes the rollout, and no device gets a second command (a command id re-published by the new
leader is the same id, which the device applies once)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from iotflow import topics
from iotflow.testing import committed_offsets, http_json, topic_messages, wait_for
from tests.integration.test_rollouts import rig  # noqa: F401 - the fixture


@pytest.mark.timeout(360)
def test_the_leader_killed_mid_rollout_the_other_worker_finishes_it_without_a_second_command(rig, chaos):  # noqa: F811
    r = rig(200, workers=2)
    rollout = r.create({"firmware": r.publish("4.0.0"), "targets": {"devices": r.ids}, "waves": {"sizes": [20, 180]},
                        "health_window_s": 0, "dispatch_per_s": 20})
    assert wait_for(lambda: r.counter.total() >= 40, timeout=120)
    leader = next(w for w in r.workers if http_json("GET", f"{w.url}/health/ready")[2].get("leader"))
    r.worker = next(w for w in r.workers if w is not leader)
    ticks_before = r.worker.log_text().count("orchestrator_tick")
    at_kill = r.counter.total()
    leader.kill()
    answers: dict[str, int] = {}
    ended = wait_for(lambda: _status(r, rollout["id"], answers) in {"completed", "aborted", "canceled"}, timeout=150)
    done = r.rollout(rollout["id"])
    assert ended and done["status"] == "completed" and done["by_state"] == {"SUCCEEDED": 200}, json.dumps(
        {"rollout": {k: done.get(k) for k in ("status", "by_state")}, "answers": answers,
         "unfinished": _unfinished(r, rollout["id"])})
    assert r.worker.log_text().count("orchestrator_tick") > ticks_before  # the survivor took over
    # The survivor's rollout-progress table (its leader publishes now) says what PostgreSQL says.
    snapshot = wait_for(lambda: r.progress_as_counted(rollout["id"]), timeout=30)
    assert snapshot and snapshot["status"] == "completed", http_json(
        "GET", f"{r.worker.url}/api/v1/firmware/rollouts/{rollout['id']}/progress", headers=r.admin)[2]
    # Each device saw one command id (re-publishing the same id is allowed; the device applies it once).
    assert len(r.counter.by_device) == 200
    assert {len(set(ids)) for ids in r.counter.by_device.values()} == {1}
    r.close()
    installs = [s["installs"] for s in r.summary["devices"].values()]
    # In the table: commands sent, devices updated once, devices never updated, second installs.
    chaos(fault=f"leader worker SIGKILL mid-rollout ({at_kill} of 200 commanded)", sent=200,
          stored=installs.count(1), lost=installs.count(0), duplicated=sum(n - 1 for n in installs if n > 1))
    assert set(installs) == {1}


def _status(r, rollout_id: str, answers: dict[str, int]) -> str | None:
    """The rollout's status as the surviving worker reports it; None while it answers 503 (with
    Retry-After: its registry pool is busy with the takeover) or not within 10 s — a client asks
    again. ``answers`` counts what came back, for the failure message."""
    try:
        status, _, body = http_json("GET", f"{r.worker.url}/api/v1/firmware/rollouts/{rollout_id}", headers=r.admin)
    except OSError as exc:  # no answer within the timeout
        answers[type(exc).__name__] = answers.get(type(exc).__name__, 0) + 1
        return None
    answers[str(status)] = answers.get(str(status), 0) + 1
    if status == 503:
        return None
    assert status == 200, body
    return body["status"]


def _unfinished(r, rollout_id: str) -> dict[str, Any]:
    """For a failure message: each device not SUCCEEDED — its execution row, the command ids the
    broker delivered to it and the states it reported to Kafka — to tell a lost command, a lost
    report and a report never applied apart."""
    rows = {d: row for d, row in r.executions(rollout_id).items() if row["state"] != "SUCCEEDED"}
    reported: dict[str, list[str]] = {}
    for message in asyncio.run(topic_messages(r.settings, topics.FIRMWARE_STATUS)):
        device = (message.key or b"").decode()
        if device in rows:
            state = json.loads(message.value).get("state", "?")
            reported.setdefault(device, []).append(f"{state}@{message.partition}:{message.offset}")
    unfinished: dict[str, Any] = {
        d: {"state": row["state"], "command_id": str(row["command_id"]), "attempts": row["attempts"],
            "commands_received": r.counter.by_device.get(d, []), "reported": reported.get(d, [])}
        for d, row in rows.items()}
    # Whether the reports were read and judged (stale, unknown, duplicate) or never read at all.
    unfinished["survivor_reports"] = {
        outcome: r.worker.metric(f'iotflow_firmware_reports_total{{outcome="{outcome}"')
        for outcome in ("applied", "duplicate", "stale", "unknown", "invalid")}
    unfinished["committed_firmware_status"] = asyncio.run(committed_offsets(r.settings, topics.FIRMWARE_STATUS))
    return unfinished
