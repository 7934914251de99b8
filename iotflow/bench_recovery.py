"""``iotflow bench-recovery``: how long a worker takes to have its tables back, in one run.

1. N telemetry messages with N distinct msg_ids (N dedup marks, plus the devices' accounts and
   last values) are preloaded into a fresh topic, and one worker takes them all.
2. **Restart after kill -9**: that worker is killed and started again on its state folder. RocksDB
   kept the tables; only the changelogs' tail past the store's persisted offsets is read.
3. **A new host**: a worker on an empty state folder restores every table from the changelogs
   (keys restored per second).
4. **Take-over**: two workers share the group; one is killed with kill -9 and the other takes its
   partitions over — once with a standby replica of every table partition on the survivor
   (``IOTFLOW_TABLE_STANDBY_REPLICAS=1``, the default) and once without (``0``), when it must
   restore them from the changelogs.

Each phase is read from the worker's ``/health/ready`` every 0.1 s: ``serving`` (the web server
answers), ``rebalancing`` and ``restoring`` (the ``kafka`` check's reason), ``ready``. A take-over
is timed from the kill: the group notices a dead member only after the session timeout
(``IOTFLOW_KAFKA_SESSION_TIMEOUT_S``), then the survivor rebalances and restores.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from iotflow.bench import DEVICES, _preload, _received, fresh_run
from iotflow.registry import provision
from iotflow.settings import Settings
from iotflow.stack.base import free_loopback_port
from iotflow.testing import WorkerProcess, http_get_json, wait_for

POLL_S = 0.1
STANDBY_LEFT = "iotflow_table_standby_remaining_records"
STANDBY_WAIT_S = 60.0


def _worker(bench: Settings, state: Path, **env: str) -> WorkerProcess:
    return WorkerProcess({"IOTFLOW_APP_ID": bench.app_id, "IOTFLOW_TOPIC_PREFIX": bench.topic_prefix,
                          "IOTFLOW_WEB_PORT": str(free_loopback_port()), "IOTFLOW_DATA_DIR": str(state), **env},
                         state.with_suffix(".log"))


def _phase(worker: WorkerProcess) -> str:
    """Where the worker is on its way to ready, from its readiness answer."""
    return _readiness(worker)[0]


def _readiness(worker: WorkerProcess) -> tuple[str, int]:
    """The worker's phase and, once ready, how many partitions it holds."""
    try:
        status, body = http_get_json(f"{worker.url}/health/ready", timeout=2)
    except OSError:
        return "starting", 0
    detail = str(((body or {}).get("checks") or {}).get("kafka", {}).get("detail", ""))
    if status == 200:
        return "ready", int(detail.split()[0]) if detail[:1].isdigit() else 0
    if "restoring" in detail:
        return "restoring", 0
    if "rebalancing" in detail:
        return "rebalancing", 0
    return "serving", 0


def _timeline(worker: WorkerProcess, since: float, *, timeout: float) -> dict[str, float]:
    """Seconds from ``since`` to the first sight of each phase, until the worker is ready."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.assert_running("on its way to ready")
        phase = _phase(worker)
        seen.setdefault(phase, round(time.monotonic() - since, 2))
        if phase == "ready":
            return seen
        time.sleep(POLL_S)
    raise TimeoutError(f"worker on port {worker.web_port} not ready within {timeout:.0f} s; phases seen: {seen}\n"
                       f"{worker.log_text()[-3000:]}")


def _restoring_s(seen: dict[str, float]) -> float:
    """How long the worker read changelogs (0 when no poll caught it restoring)."""
    return round(seen["ready"] - seen["restoring"], 2) if "restoring" in seen else 0.0


async def _changelog_records(bench: Settings) -> int:
    """Records in the app's table changelogs (their end offsets: nothing was compacted yet)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bench.kafka_bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(bench.app_id) and t.endswith("-changelog")]
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bench.kafka_bootstrap)
    await consumer.start()
    try:  # a table's changelog has the partitions of the app's topics
        partitions = [TopicPartition(name, p) for name in names for p in range(bench.topic_partitions)]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


def _take_over(bench: Settings, root: Path, standby: int, timeout: float) -> dict[str, object]:
    """The victim starts alone on an empty folder and restores every partition; the survivor joins
    once it is ready and takes half, with or without standby replicas of the other half. Once the
    survivor's standbys have read the changelogs — or a minute has passed (how many records they
    still lacked is in the result) — the victim is killed; the survivor's phases from the kill. Its
    own folder never held the victim's partitions: without standbys it restores them from the
    changelogs."""
    env = {"IOTFLOW_TABLE_STANDBY_REPLICAS": str(standby)}
    with _worker(bench, root / f"victim-{standby}", **env) as victim:
        _timeline(victim, time.monotonic(), timeout=timeout)
        with _worker(bench, root / f"survivor-{standby}", **env) as survivor:
            _timeline(survivor, time.monotonic(), timeout=timeout)
            wait_for(lambda: all(_phase(w) == "ready" and w.metric(STANDBY_LEFT) == 0 for w in (survivor, victim)),
                     timeout=STANDBY_WAIT_S)
            left = survivor.metric(STANDBY_LEFT)
            killed = time.monotonic()
            victim.kill()
            seen: dict[str, object] = {"survivor_standby_records_left": int(left),
                                       **_after_kill(survivor, killed, timeout)}
            survivor.terminate()  # leaves the group: the next workers need not wait out its session
    return seen


def _after_kill(survivor: WorkerProcess, killed: float, timeout: float) -> dict[str, float]:
    """The survivor's phases after the kill, until it is ready with more partitions than before
    (a poll may miss a short rebalance; the count it holds does not)."""
    held = _readiness(survivor)[1]
    deadline = time.monotonic() + timeout
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        survivor.assert_running("while it took over")
        phase, partitions = _readiness(survivor)
        if phase != "ready":
            seen.setdefault("unready", round(time.monotonic() - killed, 2))
            seen.setdefault(phase, round(time.monotonic() - killed, 2))
        elif partitions > held:
            seen["ready"] = round(time.monotonic() - killed, 2)
            return seen
        time.sleep(POLL_S)
    raise TimeoutError(f"the survivor did not take over within {timeout:.0f} s; phases seen: {seen}")


def run(settings: Settings, keys: int) -> dict[str, object]:
    bench, run_id = fresh_run(settings, "benchrec")
    device_prefix = f"rec{run_id}-"
    asyncio.run(provision(bench, [f"{device_prefix}{i}" for i in range(DEVICES)], device_type="bench"))
    asyncio.run(_preload(bench, device_prefix, keys))
    timeout = max(300.0, keys / 1000)
    with tempfile.TemporaryDirectory(prefix="iotflow-bench-recovery-") as folder:
        root = Path(folder)
        first = _worker(bench, root / "first")
        with first:
            started = time.monotonic()
            _timeline(first, started, timeout=timeout)
            while _received(first) < keys:
                first.assert_running("while it took the preload")
                time.sleep(0.5)
            ingest_s = time.monotonic() - started
            first.kill()
        records = asyncio.run(_changelog_records(bench))

        # The same folder again: what an operator sees after a crash and a restart in place.
        restarted = _worker(bench, root / "first")
        with restarted:
            restart = _timeline(restarted, time.monotonic(), timeout=timeout)
            restarted.terminate()
        # An empty folder: a new host reads every changelog from the start.
        fresh = _worker(bench, root / "fresh")
        with fresh:
            rebuilt = _timeline(fresh, time.monotonic(), timeout=timeout)
            fresh.terminate()
        with_standby = _take_over(bench, root, 1, timeout)
        without_standby = _take_over(bench, root, 0, timeout)
    restored_s = _restoring_s(rebuilt)
    return {
        "keys": keys,
        "changelog_records": records,
        "ingest_msgs_per_s": round(keys / ingest_s),
        "restart_after_kill9": restart,
        "restart_restoring_s": _restoring_s(restart),
        "new_host": rebuilt,
        "new_host_restoring_s": restored_s,
        "new_host_records_restored_per_s": round(records / restored_s) if restored_s else None,
        "take_over_with_standby": with_standby,
        "take_over_without_standby": without_standby,
        "session_timeout_s": bench.kafka_session_timeout_s,
    }
