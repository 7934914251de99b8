"""A real worker against the real stack: ingest end to end through Kafka, changelog recovery,
scaling out, exactly-once mode, shutdown and bad settings."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from iotflow.tables.ingest import MARKS
from iotflow.testing import (
    WorkerProcess,
    dlq_messages,
    http_get_json,
    http_json,
    produce,
    produce_telemetry,
    register,
    stored_messages,
    telemetry,
    wait_for,
)


def accounts_via(worker: WorkerProcess, devices: list[str]) -> dict[str, dict]:
    accounts = {}
    for device_id in devices:
        # 503 + Retry-After while the worker cannot route yet (just started, or rebalancing): retry.
        status, body = wait_for(lambda: (r := http_get_json(f"{worker.url}/api/v1/pipeline/accounting/devices/{device_id}",
                                                             headers=worker.bearer()))[0] != 503 and r, timeout=30)
        assert status == 200, body
        accounts[device_id] = body
    return accounts


def wait_until_received(worker: WorkerProcess, expected: dict[str, int], timeout: float = 90.0,
                        fields: tuple[str, ...] = ("received",)) -> dict[str, dict]:
    """Poll until every device's account shows its expected count in ``fields`` (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        accounts = accounts_via(worker, list(expected))
        done = all(accounts[d][f] >= n for d, n in expected.items() for f in fields)
        if done or time.monotonic() > deadline:
            return accounts
        time.sleep(0.25)


def wait_until_stored(worker: WorkerProcess, expected: dict[str, int], timeout: float = 90.0) -> dict[str, dict]:
    """Rows reach the database before the flush writes the accounts that count them: wait for both."""
    return wait_until_received(worker, expected, timeout, fields=("stored", "received"))


def received(accounts: dict[str, dict]) -> dict[str, int]:
    return {d: a["received"] for d, a in accounts.items()}


@pytest.fixture
def devices(settings, run_id: str) -> list[str]:
    """Registered devices: the worker stores telemetry of registered devices only."""
    ids = [f"dev-{run_id}-{i}" for i in range(20)]
    asyncio.run(register(settings, ids))
    return ids


def test_liveness_answers_200_and_readiness_checks_each_dependency(start_worker):
    worker = start_worker()
    worker.wait_ready()
    status, body = http_get_json(f"{worker.url}/health/live")
    assert (status, body["status"]) == (200, "ok")
    ready = wait_for(lambda: (r := http_get_json(f"{worker.url}/health/ready"))[0] == 200 and r[1], timeout=30)
    assert ready and ready["status"] == "ready", ready
    assert {name: check["status"] for name, check in ready["checks"].items()} == {
        "kafka": "ok", "postgres": "ok", "schema": "ok", "redis": "ok"}
    assert "partitions assigned" in ready["checks"]["kafka"]["detail"]


def test_valid_messages_are_stored_once_duplicates_dropped_and_invalid_sent_to_the_dlq(
    settings, start_worker, devices, run_id
):
    worker = start_worker()
    worker.wait_ready()
    originals = [(d.encode(), telemetry(d, seq)) for seq in range(50) for d in devices]
    duplicates = originals[::10]  # the same bytes again: a device retry
    invalid = [(devices[0].encode(), b"not json"), (devices[1].encode(), b'{"device_id": 7}')]
    asyncio.run(produce(settings, originals + duplicates + invalid))

    expected = {d: 50 for d in devices}
    for key, _ in duplicates + invalid:
        expected[key.decode()] += 1
    wait_until_stored(worker, {d: 50 for d in devices})
    accounts = wait_until_received(worker, expected)
    assert received(accounts) == expected
    assert sum(a["duplicates"] for a in accounts.values()) == len(duplicates)
    assert sum(a["invalid"] for a in accounts.values()) == len(invalid)
    assert all(a["gaps"] == 0 and a["stored"] == 50 for a in accounts.values())

    rows, messages = asyncio.run(stored_messages(settings, f"dev-{run_id}-"))
    assert (rows, messages) == (len(originals) * 2, len(originals))  # two metrics per message
    dead = asyncio.run(dlq_messages(settings))
    assert sorted(m.value for m in dead) == sorted(v for _, v in invalid)
    headers = dict(dead[0].headers)
    assert headers["iotflow-error"] == b"invalid"
    assert headers["iotflow-source-topic"].decode().endswith("sensor-data")
    assert {"iotflow-field", "iotflow-reason", "iotflow-source-partition", "iotflow-source-offset"} <= set(headers)


def test_sigterm_stops_the_worker_with_exit_code_0_within_15_seconds(start_worker):
    worker = start_worker()
    worker.wait_ready()
    assert worker.terminate(timeout=15) == 0
    assert "Closing event loop" in worker.log_text()


def test_a_fresh_worker_restores_its_tables_from_the_changelog_and_still_catches_duplicates(
    settings, start_worker, devices, run_id
):
    first = start_worker()
    first.wait_ready()
    asyncio.run(produce_telemetry(settings, devices, per_device=20))
    assert received(wait_until_received(first, {d: 20 for d in devices})) == {d: 20 for d in devices}
    assert first.terminate() == 0

    # Same app (consumer group, changelogs), empty RocksDB folder: everything comes from Kafka.
    second = start_worker(fresh_state=True)
    second.wait_ready()
    assert received(accounts_via(second, devices)) == {d: 20 for d in devices}
    # A duplicate of a message stored before the restart is caught by the restored dedup marks.
    asyncio.run(produce(settings, [(d.encode(), telemetry(d, 5)) for d in devices]))
    accounts = wait_until_received(second, {d: 21 for d in devices})
    assert all(a["duplicates"] == 1 and a["stored"] == 20 for a in accounts.values())  # stored before the restart
    assert asyncio.run(stored_messages(settings, f"dev-{run_id}-"))[1] == 20 * len(devices)


def test_two_workers_split_the_partitions_and_answer_for_each_other(settings, start_worker, devices):
    one = start_worker()
    one.wait_ready()
    two = start_worker()
    two.wait_ready()
    asyncio.run(produce_telemetry(settings, devices, per_device=10))
    expected = {d: 10 for d in devices}
    # Each device lives on one worker; @app.table_route forwards the request to its owner.
    assert received(wait_until_received(one, expected)) == expected
    assert received(accounts_via(two, devices)) == expected
    status, fleet = http_get_json(f"{two.url}/api/v1/pipeline/accounting", headers=two.bearer())
    assert status == 200
    assert len(fleet["workers"]) == 2 and fleet["workers_unreachable"] == []
    assert fleet["received"] == fleet["accepted"] == 10 * len(devices)


def test_an_exactly_once_worker_stores_through_kafka_transactions(settings, start_worker, devices, run_id):
    worker = start_worker(IOTFLOW_PROCESSING_GUARANTEE="exactly_once")
    worker.wait_ready()
    asyncio.run(produce_telemetry(settings, devices, per_device=10))
    accounts = wait_until_stored(worker, {d: 10 for d in devices})
    assert all(a["stored"] == 10 and a["received"] == 10 for a in accounts.values())
    assert worker.terminate() == 0


def test_telemetry_of_devices_only_postgresql_knows_yet_is_decided_without_waiting_out_its_time(
    settings, start_worker, run_id
):
    # The registry table learns registrations from device-events, which the fetcher delivering
    # telemetry delivers too: a full parking lot stops the ingest agent, its full buffer blocks the
    # fetcher, and no registration arrives. Waiting telemetry therefore asks PostgreSQL as well. Here
    # the devices exist only there (inserted without an outbox event, so the table never learns them).
    known, gone = f"pgonly-{run_id}", f"pgonly-deleted-{run_id}"
    asyncio.run(_insert_without_events(settings, {known: False, gone: True}))
    worker = start_worker(IOTFLOW_UNKNOWN_DEVICE_WAIT_S="120")
    worker.wait_ready()
    sent = {d: [(d.encode(), telemetry(d, seq)) for seq in range(10)] for d in (known, gone)}
    started = time.monotonic()
    asyncio.run(produce(settings, sent[known] + sent[gone]))

    accounts = wait_until_received(worker, {known: 10, gone: 10}, timeout=60)
    assert time.monotonic() - started < 60  # decided long before the 120 s wait ran out
    assert (accounts[known]["accepted"], accounts[known]["rejected"]) == (10, 0)
    assert (accounts[gone]["accepted"], accounts[gone]["rejected"], accounts[gone]["stored"]) == (0, 10, 0)
    assert wait_until_stored(worker, {known: 10})[known]["stored"] == 10
    kinds = dlq_kinds(settings)
    assert sorted(r.value for r in kinds[b"deleted_device"]) == sorted(v for _, v in sent[gone])
    assert b"unknown_device" not in kinds


async def _insert_without_events(settings, deleted: dict[str, bool]) -> None:
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        await conn.executemany("INSERT INTO devices (id, name, type, deleted_at) "
                               "VALUES ($1, $1, 'sensor', CASE WHEN $2 THEN now() END)",
                               list(deleted.items()))
    finally:
        await conn.close()


def test_a_bad_setting_stops_the_worker_with_one_line_naming_it(tmp_path: Path):
    faust = Path(sys.executable).with_name("faust")
    done = subprocess.run(
        [str(faust), "-A", "iotflow", "worker", "-l", "info"],
        env={"PATH": "/usr/bin:/bin", "IOTFLOW_WEB_PORT": "abc"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == ["iotflow: expected a TCP port number (1-65535) for IOTFLOW_WEB_PORT (got 'abc')"]


def post_json(worker: WorkerProcess, path: str, body: bytes) -> tuple[int, dict, dict]:
    return http_json("POST", worker.url + path, body, timeout=30, headers=worker.bearer("operator"))


def test_http_ingest_accepts_a_valid_batch_only_after_kafka_has_it(settings, start_worker, devices, run_id):
    worker = start_worker()
    worker.wait_ready()
    items = [telemetry(d, seq) for d in devices[:5] for seq in range(10)]
    status, headers, body = post_json(worker, "/api/v1/ingest", b"[" + b",".join(items) + b"]")
    assert (status, body) == (202, {"accepted": 50})
    assert headers.get("X-Request-ID")
    accounts = wait_until_stored(worker, {d: 10 for d in devices[:5]})
    assert all(a["stored"] == 10 and a["received"] == 10 for a in accounts.values())


def test_http_ingest_rejects_a_batch_with_any_invalid_item_and_names_each(settings, start_worker, devices, run_id):
    worker = start_worker()
    worker.wait_ready()
    good = telemetry(devices[0], 0)
    status, headers, body = post_json(worker, "/api/v1/ingest", b"[" + good + b', {"device_id": 1}, "x"]')
    assert status == 422
    assert headers["Content-Type"].startswith("application/problem+json")
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(1, "device_id"), (2, "payload")]
    assert body["request_id"]
    time.sleep(2)  # nothing may arrive: give a wrongly sent message time to show up
    assert accounts_via(worker, [devices[0]])[devices[0]]["received"] == 0
    status, _, body = post_json(worker, "/api/v1/ingest", b"{not an array")
    assert status == 400 and body["title"] == "Body is not a JSON array"


def metric_value(worker: WorkerProcess, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{worker.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_dedup_marks_restored_after_a_restart_still_expire(settings, start_worker, devices, run_id):
    # faust #385: keys restored from a changelog never expired. The window here is 3 s.
    first = start_worker(IOTFLOW_DEDUP_WINDOW_S="3")
    first.wait_ready()
    asyncio.run(produce_telemetry(settings, devices, per_device=25))
    wait_until_stored(first, {d: 25 for d in devices})
    assert first.terminate() == 0
    time.sleep(3.5)  # every mark is now older than the window

    second = start_worker(IOTFLOW_DEDUP_WINDOW_S="3")  # same state folder: marks come back from RocksDB
    second.wait_ready()
    asyncio.run(produce_telemetry(settings, devices, per_device=25, first_seq=25))
    wait_until_stored(second, {d: 50 for d in devices})
    # Expiry deletes a few marks per event in each partition: keep a trickle of events flowing.
    # Without expiry of restored marks the store would stay above the 500 restored ones forever.
    # The gauge counts the expiry index, so it falls as marks expire whether or not the restored ones
    # were indexed: the store itself is counted once the worker has stopped.
    deadline, seq = time.monotonic() + 90, 1000
    while metric_value(second, "iotflow_dedup_marks") >= 25 * len(devices):
        assert time.monotonic() < deadline, "marks did not expire"
        asyncio.run(produce_telemetry(settings, devices, per_device=1, first_seq=seq))
        seq += 1
        time.sleep(0.5)
    assert metric_value(second, "iotflow_dedup_marks_expired_total") >= 25 * len(devices)
    assert second.terminate() == 0
    assert marks_in_store(second) < 25 * len(devices), "restored marks stayed in the store"


def marks_in_store(worker: WorkerProcess) -> int:
    """Dedup marks in a stopped worker's RocksDB (every partition it held)."""
    from rocksdict import AccessType, Options, Rdict

    found, paths = 0, list(Path(worker.env["IOTFLOW_DATA_DIR"]).rglob(f"*{MARKS}-*.db"))
    assert paths, f"no {MARKS} store in {worker.env['IOTFLOW_DATA_DIR']}"
    for path in paths:
        db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())  # as Faust opens it
        try:
            found += sum(1 for _ in db.keys())
        finally:
            db.close()
    return found


def dlq_kinds(settings) -> dict[bytes, list]:
    found: dict[bytes, list] = {}
    for record in asyncio.run(dlq_messages(settings)):
        found.setdefault(dict(record.headers)["iotflow-error"], []).append(record)
    return found


def test_telemetry_of_a_deleted_device_is_rejected_counted_and_kept_in_the_dlq(settings, start_worker, devices, run_id):
    worker = start_worker()
    worker.wait_ready()
    gone, live = devices[0], devices[1]
    worker.wait_registered([gone, live])
    status, _, body = http_json("DELETE", f"{worker.url}/api/v1/devices/{gone}", headers=worker.bearer("admin"))
    assert status == 200, body
    deleted = wait_for(lambda: http_get_json(f"{worker.url}/api/v1/devices/{gone}/state",
                                             headers=worker.bearer())[1].get("deleted"), timeout=30)
    assert deleted, "the deletion did not reach the registry table"

    sent = [(d.encode(), telemetry(d, seq)) for seq in range(10) for d in (gone, live)]
    asyncio.run(produce(settings, sent))
    accounts = wait_until_received(worker, {gone: 10, live: 10})
    assert (accounts[gone]["rejected"], accounts[gone]["accepted"], accounts[gone]["stored"]) == (10, 0, 0)
    assert (accounts[live]["rejected"], accounts[live]["accepted"]) == (0, 10)
    assert wait_until_stored(worker, {live: 10})[live]["stored"] == 10
    assert asyncio.run(stored_messages(settings, gone))[1] == 0

    rejected = dlq_kinds(settings)[b"deleted_device"]
    assert sorted(r.value for r in rejected) == sorted(v for k, v in sent if k == gone.encode())  # the original bytes
    headers = dict(rejected[0].headers)
    assert headers["iotflow-field"] == b"device_id" and gone.encode() in headers["iotflow-reason"]


def test_a_device_registered_after_its_first_messages_loses_nothing_and_an_unknown_one_goes_to_the_dlq(
    settings, start_worker, run_id
):
    # The seed's registration race: telemetry waits (unacknowledged) for its device's registration.
    late, never = f"late-{run_id}", f"never-{run_id}"
    worker = start_worker(IOTFLOW_UNKNOWN_DEVICE_WAIT_S="15")
    worker.wait_ready()
    sent = {d: [(d.encode(), telemetry(d, seq)) for seq in range(10)] for d in (late, never)}
    sent[late].append((late.encode(), b"not json"))  # waits behind its device's valid messages too
    started = time.monotonic()
    asyncio.run(produce(settings, sent[late] + sent[never]))
    assert wait_for(lambda: metric_value(worker, "iotflow_ingest_parked_messages") == 21, timeout=30)
    asyncio.run(register(settings, [late]))

    accounts = wait_until_stored(worker, {late: 10})
    assert (accounts[late]["accepted"], accounts[late]["gaps"]) == (10, 0)
    assert asyncio.run(stored_messages(settings, late)) == (20, 10)
    accounts = wait_until_received(worker, {late: 11, never: 10}, timeout=60)
    assert accounts[late]["invalid"] == 1
    assert (accounts[never]["rejected"], accounts[never]["stored"]) == (10, 0)
    assert time.monotonic() - started >= 15  # the unknown device was given its whole wait
    kinds = dlq_kinds(settings)
    assert sorted(r.value for r in kinds[b"unknown_device"]) == sorted(v for _, v in sent[never])
    assert [r.value for r in kinds[b"invalid"]] == [b"not json"]
    assert metric_value(worker, "iotflow_ingest_parked_messages") == 0
