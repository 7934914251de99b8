"""Rebalances under HTTP and ingest load (issue 7, scenarios 11 and 12): two workers restarted one
after the other (SIGTERM, drain, start again), and a third worker joining then leaving. Clients go
through a load balancer that keeps a worker in rotation while its ``/health/ready`` says 200 and
honours ``Retry-After`` on a 503 (a table's owner moving during a rebalance answers so, by
contract) up to three times: no request may fail, no message be lost, no row be stored twice, and
the table-backed views answer from whichever worker owns their keys afterwards."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from iotflow.testing import http_json, register, stored_messages, wait_for
from tests.reliability.test_graceful_shutdown import Producer

DRAIN_S = 3.0
RETRIES = 3  # a client's retries of a 503 with Retry-After


class PoolBalancer(threading.Thread):
    """Health-checks every worker of ``pool`` (a list it may change) and sends clients' requests to
    one in rotation; counts answers, 503 retries and failures."""

    def __init__(self, pool: list, devices: list[str]) -> None:
        super().__init__(daemon=True)
        self.pool, self.devices = pool, devices
        self.in_rotation: list = []
        self.stop = threading.Event()
        self.answered = 0
        self.retried = 0
        self.failures: list[object] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        clients = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(4)]
        for client in clients:
            client.start()
        while not self.stop.is_set():
            ready = []
            for worker in list(self.pool):
                try:
                    if http_json("GET", f"{worker.url}/health/ready", timeout=2)[0] == 200:
                        ready.append(worker)
                except OSError:
                    pass
            with self.lock:
                self.in_rotation = ready
            time.sleep(0.1)
        for client in clients:
            client.join(timeout=30)

    def _pick(self):
        with self.lock:
            return random.choice(self.in_rotation) if self.in_rotation else None

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            worker = self._pick()
            if worker is None:
                time.sleep(0.05)
                continue
            device = rng.choice(self.devices)
            for attempt in range(RETRIES + 1):
                try:
                    status, headers, body = http_json("GET", f"{worker.url}/api/v1/devices/{device}/state",
                                                      headers=worker.bearer(), timeout=10)
                except OSError as exc:
                    self.failures.append(repr(exc))
                    break
                if status == 503 and "Retry-After" in headers and attempt < RETRIES:
                    self.retried += 1
                    time.sleep(min(float(headers["Retry-After"]), 1.0))
                    continue
                if status == 200:
                    self.answered += 1
                else:
                    self.failures.append((status, body))
                break


def _setup(settings, start_worker, run_id: str, prefix: str, workers: int):
    devices = [f"{prefix}-{run_id}-{i}" for i in range(20)]
    asyncio.run(register(settings, devices))
    pool = [start_worker(IOTFLOW_SHUTDOWN_DRAIN_S=str(DRAIN_S)) for _ in range(workers)]
    for worker in pool:
        worker.wait_ready()
        worker.wait_registered(devices)
    for worker in pool:
        assert wait_for(lambda: http_json("GET", f"{worker.url}/health/ready")[0] == 200, timeout=90)
    producer = Producer(settings, devices)
    producer.start()
    balancer = PoolBalancer(pool, devices)
    balancer.start()
    stored_prefix = f"{prefix}-{run_id}-"
    assert wait_for(lambda: asyncio.run(stored_messages(settings, stored_prefix))[1] > 500, timeout=120)
    return devices, pool, producer, balancer, stored_prefix


def _in_rotation(balancer: PoolBalancer, worker) -> bool:
    with balancer.lock:
        return worker in balancer.in_rotation


def _finish(settings, producer: Producer, balancer: PoolBalancer, stored_prefix: str, started: float, chaos,
            fault: str) -> None:
    """Stop the load, wait for everything sent to be stored, record the figures, and check the data
    first: nothing lost, nothing stored twice."""
    time.sleep(3)  # load goes on a moment after the last change
    producer.stop.set()
    producer.join(timeout=30)
    assert wait_for(lambda: asyncio.run(stored_messages(settings, stored_prefix))[1] == producer.sent, timeout=180), (
        f"stored {asyncio.run(stored_messages(settings, stored_prefix))[1]} of {producer.sent}")
    balancer.stop.set()
    balancer.join(timeout=30)
    rows, messages = asyncio.run(stored_messages(settings, stored_prefix))
    chaos(fault=fault, sent=producer.sent, stored=messages, lost=producer.sent - messages,
          duplicated=rows // 2 - messages, requests=balancer.answered + len(balancer.failures),
          failed_requests=len(balancer.failures), recovery_s=round(time.monotonic() - started, 1),
          retried_503=balancer.retried)
    assert (rows, messages) == (2 * producer.sent, producer.sent)


@pytest.mark.timeout(600)
def test_a_rolling_restart_of_two_workers_fails_no_request_and_loses_nothing(settings, start_worker, run_id, chaos):
    devices, pool, producer, balancer, stored_prefix = _setup(settings, start_worker, run_id, "roll", 2)
    started = time.monotonic()
    for i in range(len(pool)):
        old = pool[i]
        old.proc.terminate()  # SIGTERM: unready at once, drains, leaves the group
        assert old.proc.wait(timeout=DRAIN_S + 60) == 0, old.log_text()[-3000:]
        new = start_worker(IOTFLOW_WEB_PORT=str(old.web_port), IOTFLOW_SHUTDOWN_DRAIN_S=str(DRAIN_S))
        pool[i] = new  # same port and state folder: the same worker, restarted
        new.wait_ready()
        assert wait_for(lambda: _in_rotation(balancer, new), timeout=90), f"{new.url} never came back into rotation"
    _finish(settings, producer, balancer, stored_prefix, started, chaos,
            "rolling restart of two workers (SIGTERM, start) under HTTP and ingest load")
    assert balancer.answered > 200
    assert balancer.failures == [], (len(balancer.failures), balancer.failures[:5])


@pytest.mark.timeout(600)
def test_a_third_worker_joining_and_leaving_loses_nothing_and_views_answer_from_the_new_owners(
        settings, start_worker, run_id, chaos):
    devices, pool, producer, balancer, stored_prefix = _setup(settings, start_worker, run_id, "join", 2)
    started = time.monotonic()
    third = start_worker(IOTFLOW_SHUTDOWN_DRAIN_S=str(DRAIN_S))
    pool.append(third)
    third.wait_ready()
    assert wait_for(lambda: _in_rotation(balancer, third), timeout=90), "the third worker never came into rotation"
    # Every device's state answers on the newcomer: from its own table partitions or routed to their owner.
    viewer = third.bearer()
    for device in devices:
        assert wait_for(lambda: http_json("GET", f"{third.url}/api/v1/devices/{device}/state",
                                          headers=viewer)[0] == 200, timeout=30), device
    time.sleep(5)  # ingest and reads with three owners
    pool.remove(third)
    third.proc.terminate()
    assert third.proc.wait(timeout=DRAIN_S + 60) == 0, third.log_text()[-3000:]
    _finish(settings, producer, balancer, stored_prefix, started, chaos,
            "a third worker joins, then leaves (SIGTERM), under HTTP and ingest load")
    assert balancer.failures == [], (len(balancer.failures), balancer.failures[:5])
    for worker in pool:  # the views answer from the owners after it left
        for device in devices:
            assert wait_for(lambda: http_json("GET", f"{worker.url}/api/v1/devices/{device}/state",
                                              headers=worker.bearer())[0] == 200, timeout=30), (worker.url, device)
