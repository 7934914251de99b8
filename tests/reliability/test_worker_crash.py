"""Invariants 1-3 under crashes: kill -9 the worker at random moments of a 100,000-message run,
restart it each time, then count rows: nothing lost, nothing stored twice, dedup state restored."""
from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time

import asyncpg
import pytest

from iotflow.testing import http_get_json, produce, register, stored_messages, telemetry, wait_for

DEVICES = 50
PER_DEVICE = 2000  # 100,000 messages
DUPLICATE_EVERY = 50  # 2% device retries on top


def crash_run(settings, start_worker, run_id: str, chaos, *, devices: int, per_device: int, kills: int,
              **env: str):
    """Produce ``devices × per_device`` messages (+2% retries), kill -9 the worker ``kills`` times
    while it stores them (restarting on the same state folder, and once on an empty one), then
    check every message is stored exactly once and the accounts are exact. Returns the final
    worker, the originals and the fleet totals."""
    rng = random.Random(run_id)
    ids = [f"crash-{run_id}-{i}" for i in range(devices)]
    prefix = f"crash-{run_id}-"
    originals = [(d.encode(), telemetry(d, seq)) for seq in range(per_device) for d in ids]
    retries = originals[::DUPLICATE_EVERY]
    asyncio.run(register(settings, ids))

    def stored() -> int:
        return asyncio.run(stored_messages(settings, prefix))[1]

    def counted() -> int:
        """The sink's own count of the messages it stored (exact, and read in milliseconds where
        counting the rows takes seconds on the test database): for timing the kills."""
        return asyncio.run(_counted(settings.tsdb_dsn, prefix))

    port, target, producing = None, 0, None
    sending = concurrent.futures.ThreadPoolExecutor(1)
    try:
        for kill in range(kills):
            worker = start_worker(fresh_state=(kill == 1), **env, **({"IOTFLOW_WEB_PORT": port} if port else {}))
            port = str(worker.web_port)
            worker.wait_ready()
            if kill == 0:
                # The fleet is in the registry table before its messages arrive (else they would wait
                # for it, and a full parking lot would hold the run back). Counted from the registry
                # agent's metric, not /state: under exactly_once /state has been seen answering 500
                # (table_route without producer metadata) on a just-started broker.
                assert wait_for(lambda: worker.metric('iotflow_device_events_total{outcome="applied"') >= len(ids),
                                timeout=90), "the registrations were not applied"
                # Sent over 20 s or more while the workers store and die: none can be through the run
                # before its kill.
                rate = max(1000.0, len(originals) / 20)
                producing = sending.submit(lambda: asyncio.run(produce(settings, originals + retries, rate=rate)))
            # Killed while it stores, 5-20% of the run after the previous kill (a kill after the last
            # row would test nothing but the restore).
            target += int(len(originals) * rng.uniform(0.05, 0.2))
            assert wait_for(lambda: counted() >= target, timeout=120, interval=0.1), (
                f"worker {kill} did not get to {target} stored messages (at {counted()})")
            assert counted() < len(originals), "the run was over before the kill: make it longer"
            assert worker.kill() == -9
        assert producing is not None and producing.result(timeout=300) == len(originals) + len(retries)
    finally:
        sending.shutdown(wait=False, cancel_futures=True)  # after a failure the sender ends with its paced run

    restarted = time.monotonic()
    final = start_worker(IOTFLOW_WEB_PORT=port, **env)
    final.wait_ready()
    assert wait_for(lambda: stored() == len(originals), timeout=600), f"stored {stored()} of {len(originals)}"
    recovery_s = time.monotonic() - restarted
    rows, messages = asyncio.run(stored_messages(settings, prefix))
    chaos(fault=f"worker kill -9 ×{kills}" + (f" ({env['IOTFLOW_PROCESSING_GUARANTEE']})" if env else ""),
          sent=len(originals) + len(retries), stored=messages, lost=len(originals) - messages,
          duplicated=rows // 2 - messages, recovery_s=round(recovery_s, 1))
    assert (rows, messages) == (2 * len(originals), len(originals))

    # Every row may be in before the last worker has restored its tables (a worker before it
    # stored the rest): the accounts are read once it has.
    final.wait_recovered()
    # The accounts are exact after the crashes: each flush writes them before it acknowledges
    # its events, with the offset they counted up to, so a replay is never counted twice.
    totals = wait_for(lambda: _stable(final), timeout=120)
    assert totals, "the accounts kept changing"
    assert (totals["received"], totals["accepted"], totals["duplicates"], totals["invalid"]) == (
        len(originals) + len(retries), len(originals), len(retries), 0), (totals, _off_devices(final, originals))
    return final, originals, totals


@pytest.mark.timeout(600)
def test_kill_9s_of_an_exactly_once_worker_lose_nothing_and_store_nothing_twice(settings, start_worker, run_id, chaos):
    # Kafka transactions: table writes and offset commits of a flush commit together.
    crash_run(settings, start_worker, run_id, chaos, devices=20, per_device=1000, kills=2,
              IOTFLOW_PROCESSING_GUARANTEE="exactly_once")


@pytest.mark.timeout(900)
def test_three_kill_9s_during_a_run_lose_nothing_and_store_nothing_twice(settings, start_worker, run_id, chaos):
    final, originals, totals = crash_run(settings, start_worker, run_id, chaos, devices=DEVICES, per_device=PER_DEVICE,
                                         kills=3)
    prefix = f"crash-{run_id}-"
    rows, messages = asyncio.run(stored_messages(settings, prefix))

    # The dedup marks survived too: retries of old messages are counted as duplicates (not
    # accepted as new) and store nothing.
    asyncio.run(produce(settings, originals[:100]))
    after = wait_for(lambda: (b := _fleet(final))["received"] >= totals["received"] + 100 and b, timeout=120)
    assert after, "the retries were not counted"
    assert after["duplicates"] - totals["duplicates"] == 100
    assert after["accepted"] == totals["accepted"]  # none of the retries was taken for new
    assert asyncio.run(stored_messages(settings, prefix)) == (rows, messages)


async def _counted(dsn: str, prefix: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval("SELECT coalesce(sum(messages), 0) FROM device_stored_messages "
                                       "WHERE device_id LIKE $1", prefix + "%"))
    finally:
        await conn.close()


def _fleet(worker) -> dict:
    status, body = http_get_json(f"{worker.url}/api/v1/pipeline/accounting", headers=worker.bearer())
    assert status == 200, body
    return body


def _off_devices(worker, originals) -> dict[str, dict]:
    """For a failure message: the devices whose account is not what they were sent."""
    sent: dict[str, int] = {}
    for key, _ in originals:
        sent[key.decode()] = sent.get(key.decode(), 0) + 1
    off = {}
    for device, count in sent.items():
        status, body = http_get_json(f"{worker.url}/api/v1/pipeline/accounting/devices/{device}",
                                     headers=worker.bearer())
        if status != 200 or body.get("accepted") != count:
            off[device] = {"status": status, **{k: body.get(k) for k in ("received", "accepted", "duplicates")}}
    return off


def _stable(worker) -> dict | None:
    """The fleet accounting once two reads two seconds apart agree, else None."""
    first = _fleet(worker)
    time.sleep(2)
    second = _fleet(worker)
    return second if first["received"] == second["received"] else None
