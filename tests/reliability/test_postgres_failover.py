"""PostgreSQL's primary killed under ingest and API load (SIGKILL of the postmaster and every
process it started: a crashed host) and its synchronous streaming replica promoted a few seconds
later, as a failover manager (Patroni, pg_auto_failover) would. The worker knows both hosts from
one DSN (``target_session_attrs=read-write``) and finds the promoted one by itself: every message
is stored exactly once — the replica had every commit the worker saw, and what was not committed
was not acknowledged to Kafka either — and the API reads and writes again."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from iotflow.migrate import migrator
from iotflow.stack.pg_replication import PostgresPair
from iotflow.testing import ReadLoad, http_json, produce, register, stored_messages, telemetry, wait_for

DEVICES = 20
OUTAGE_S = 5  # between the primary's death and the promotion: a failover manager's detection time


@pytest.mark.timeout(600)
def test_the_primary_killed_and_its_replica_promoted_loses_no_committed_message(settings, start_worker, run_id,
                                                                                chaos):
    pair = PostgresPair(settings.stack_dir / "pg-failover" / run_id).start()
    worker = None
    try:
        own = dataclasses.replace(settings, pg_dsn=pair.dsn, tsdb_dsn=pair.dsn)
        asyncio.run(migrator(own).up())
        worker = start_worker(IOTFLOW_PG_DSN=pair.dsn, IOTFLOW_TSDB_DSN=pair.dsn)
        worker.wait_ready()
        prefix = f"pgf-{run_id}-"
        devices = [f"{prefix}{i}" for i in range(DEVICES)]
        asyncio.run(register(own, devices))
        worker.wait_registered(devices)
        first = [(d.encode(), telemetry(d, seq)) for seq in range(500) for d in devices]
        second = [(d.encode(), telemetry(d, seq)) for seq in range(500, 1000) for d in devices]
        total = len(first) + len(second)

        with ReadLoad(worker, [f"/api/v1/devices/{d}" for d in devices]) as load:
            asyncio.run(produce(own, first))
            assert wait_for(lambda: asyncio.run(stored_messages(own, prefix))[1] > 1000, timeout=120)
            pair.kill_primary()  # mid-stream: the sink is between COPYs of the first half
            killed = time.monotonic()
            asyncio.run(produce(own, second))  # load keeps arriving: Kafka holds it
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))
            worker.assert_running("while the primary was gone")
            pair.promote()
            promoted = time.monotonic()
            assert wait_for(lambda: asyncio.run(stored_messages(own, prefix))[1] == total, timeout=300), (
                f"stored {asyncio.run(stored_messages(own, prefix))[1]} of {total}")
            recovery_s = time.monotonic() - promoted
            # The API writes again (the registry's pool reconnected to the promoted replica) and the
            # worker is ready again, PostgreSQL included.
            created = wait_for(lambda: http_json("POST", f"{worker.url}/api/v1/devices",
                                                 {"id": f"{prefix}after", "name": "n", "type": "t"},
                                                 headers=worker.bearer("admin"))[0] == 201, timeout=60)
            assert created, "registering a device after the failover did not succeed within 60 s"
            ready = wait_for(lambda: http_json("GET", f"{worker.url}/health/ready")[0] == 200, timeout=60)
            assert ready, http_json("GET", f"{worker.url}/health/ready")

        rows, messages = asyncio.run(stored_messages(own, prefix))
        requests = sum(load.statuses.values())
        chaos(fault=f"PostgreSQL primary kill -9, sync replica promoted after {OUTAGE_S} s", sent=total,
              stored=messages, lost=total - messages, duplicated=rows // 2 - messages, requests=requests,
              failed_requests=requests - load.statuses[200], recovery_s=round(recovery_s, 1))
        assert (rows, messages) == (2 * total, total)
        assert load.statuses[200] > 100, load.statuses  # reads went on (and came back) around the failover
    finally:
        if worker is not None and worker.proc is not None:
            worker.kill()  # before its database goes for good
        pair.stop()
