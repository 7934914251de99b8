"""``iotflow bench``: the ingest path against a hand-written baseline, in one run on one machine.

1. Preload N telemetry messages (50 devices, one metric each) into a fresh ``bench-…-sensor-data``.
2. (a) raw baseline: a bare aiokafka consumer decoding JSON and writing through the same
   idempotent COPY into ``sensor_measurements`` — what a user would write by hand.
3. (c) the floors: a Faust worker that only acknowledges each record (``iotflow.bench_floor``), with
   iotflow's transport — through an agent's stream (what Faust's per-event path costs before any
   work), and handed over a fetch at a time as iotflow's ingest takes them.
   (q) the peer a user would pick instead: Quix Streams doing the same job — RocksDB-state dedup
   by msg_id, batches through the same idempotent statements (bench/quix_opponent.py, run in its
   own virtualenv, ``.bench-venv``, made from bench/requirements-quix.txt on first use); the rows
   of (a) are deleted before it runs.
4. The rows so far are deleted, then (b) an iotflow worker consumes the same topic: validation,
   the registry check, dedup marks and accounts in RocksDB with changelogs, the same sink. Its
   peak RSS is sampled. The bench's devices are registered before the preload; the worker's
   time includes taking their registrations from device-events (its telemetry waits for them).
5. Latency: at half of (b)'s rate, fresh messages stamped with their send time; p50/p99 of
   (row committed − device ts) from the database.

Both rates are messages/s over the whole topic, wall clock; the ratio (b)/(a) is the figure to
watch, since absolute numbers move with the machine's load.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from iotflow import topics
from iotflow.kafka_admin import ensure_topics
from iotflow.migrate import migrator
from iotflow.registry import provision
from iotflow.settings import Settings
from iotflow.sinks import timescale
from iotflow.sinks.timescale import MeasurementSink
from iotflow.stack import services as stack_services
from iotflow.stack.base import free_loopback_port, read_pid
from iotflow.testing import WorkerProcess, http_get_json, rss_kib

DEVICES = 50
SCALING_DEVICES = 1000
OPPONENTS = Path(__file__).resolve().parents[1] / "bench"  # the checkout's bench/ (iotflow is installed editable)


def _payload(device_id: str, seq: int, ts_ms: int) -> bytes:
    return json.dumps({"device_id": device_id, "msg_id": f"{device_id}-{seq}", "seq": seq, "ts": ts_ms,
                       "metrics": {"temp": 20.5}}).encode()


async def _preload(settings: Settings, prefix: str, count: int, *, rate: float | None = None,
                   devices: int = DEVICES) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=20,
                                max_batch_size=1024 * 1024)
    await producer.start()
    topic = topics.name(settings, topics.SENSOR_DATA)
    started = time.monotonic()
    try:
        pending = []
        for i in range(count):
            device = f"{prefix}{i % devices}"
            pending.append(await producer.send(topic, _payload(device, i // devices, int(time.time() * 1000)),
                                               key=device.encode()))
            if rate is not None:
                delay = started + (i + 1) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _baseline(settings: Settings, count: int) -> float:
    consumer = AIOKafkaConsumer(topics.name(settings, topics.SENSOR_DATA), bootstrap_servers=settings.kafka_bootstrap,
                                group_id=f"bench-raw-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest",
                                enable_auto_commit=False, max_poll_records=5000)
    sink = MeasurementSink(settings.tsdb_dsn, pool_size=2, connect_timeout_s=3, command_timeout_s=30)
    await consumer.start()
    started = time.monotonic()
    seen = 0
    try:
        while seen < count:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            rows = []
            for messages in batch.values():
                for message in messages:
                    body = json.loads(message.value)
                    when = _from_ms(body["ts"])
                    rows.extend((when, body["device_id"], name, float(value), body["msg_id"], body["seq"])
                                for name, value in body["metrics"].items())
                    seen += 1
            await sink.write(rows)
            await consumer.commit()
        return seen / (time.monotonic() - started)
    finally:
        await consumer.stop()
        await sink.stop()


def _opponent_python() -> Path:
    """The python of ``.bench-venv``, with bench/requirements-quix.txt installed (again when that file
    changes): the opponent's packages stay out of iotflow's own environment."""
    requirements = OPPONENTS / "requirements-quix.txt"
    if not requirements.is_file():
        raise RuntimeError(f"{requirements} is missing: run the bench from a checkout (pip install -e .)")
    venv = OPPONENTS.parent / ".bench-venv"
    python, stamp = venv / "bin" / "python", venv / "installed-requirements.txt"
    if not (stamp.is_file() and stamp.read_text() == requirements.read_text()):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True, timeout=1200)
        stamp.write_text(requirements.read_text())
    return python


def _quix_rate(bench: Settings, count: int) -> float:
    """(q) messages/s of the Quix Streams opponent on the preloaded topic (bench/quix_opponent.py)."""
    env = {**os.environ, "BENCH_DSN": bench.tsdb_dsn, "BENCH_STAGE_SQL": timescale.CREATE_STAGE,
           "BENCH_COPY_SQL": f"COPY {timescale.STAGE} ({', '.join(timescale.COLUMNS)}) FROM STDIN",
           "BENCH_MOVE_SQL": timescale.MOVE}
    done = subprocess.run(
        [str(_opponent_python()), str(OPPONENTS / "quix_opponent.py"), "--bootstrap", bench.kafka_bootstrap,
         "--topic", topics.name(bench, topics.SENSOR_DATA), "--messages", str(count)],
        env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the Quix Streams opponent failed ({done.returncode}): {done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["rate"])


def _from_ms(ms: int):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC)


async def _sql(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetch(query, *args, timeout=600)
    finally:
        await conn.close()


@contextlib.contextmanager
def bench_worker(bench: Settings, *, app: str = "iotflow", app_id: str | None = None,
                 env: dict[str, str] | None = None) -> Iterator[WorkerProcess]:
    """A ready worker of ``bench``'s topics with a state folder of its own, killed on exit."""
    with started_worker(bench, app=app, app_id=app_id, env=env) as worker:
        worker.wait_ready(timeout=120)
        yield worker


@contextlib.contextmanager
def started_worker(bench: Settings, *, app: str = "iotflow", app_id: str | None = None,
                   env: dict[str, str] | None = None) -> Iterator[WorkerProcess]:
    """A worker of ``bench``'s topics, started (not waited for), with a state folder of its own."""
    with tempfile.TemporaryDirectory(prefix="iotflow-bench-") as state:
        env = {"IOTFLOW_APP_ID": app_id or bench.app_id, "IOTFLOW_TOPIC_PREFIX": bench.topic_prefix,
               "IOTFLOW_WEB_PORT": str(free_loopback_port()), "IOTFLOW_DATA_DIR": state, **(env or {})}
        with WorkerProcess(env, Path(state) / "worker.log", app=app) as worker:
            yield worker


def _floor_rate(bench: Settings, messages: int, kind: str) -> float:
    """(c) a floor: a no-op Faust worker on the same topic (a fresh consumer group reads it all),
    its records through an agent's stream (``agent``) or handed over a fetch at a time (``batch``)."""
    with bench_worker(bench, app="iotflow.bench_floor", app_id=f"{bench.app_id}-floor-{kind}",
                      env={"BENCH_FLOOR": kind}) as floor:
        started = time.monotonic()
        while http_get_json(f"{floor.url}/bench/floor", timeout=10)[1]["seen"] < messages:
            time.sleep(0.2)
        return messages / (time.monotonic() - started)


def _received(worker: WorkerProcess) -> int:
    status, body = http_get_json(f"{worker.url}/api/v1/pipeline/accounting?scope=local", timeout=10,
                                 headers=worker.bearer())
    return int(body["received"]) if status == 200 else 0


def fresh_run(settings: Settings, name: str, **overrides: object) -> tuple[Settings, str]:
    """Settings of a new bench run — topics and app id of its own, created and migrated — and its id."""
    run_id = uuid.uuid4().hex[:6]
    bench = dataclasses.replace(settings, topic_prefix=f"{name}-{run_id}-", app_id=f"iotflow-{name}-{run_id}",
                                **overrides)
    asyncio.run(ensure_topics(bench))
    asyncio.run(migrator(bench).up())
    return bench, run_id


def run(settings: Settings, messages: int, *, peers: bool = True) -> dict[str, object]:
    bench, run_id = fresh_run(settings, "bench")
    device_prefix = f"bench{run_id}-"
    latency_prefix = f"lat{run_id}-"
    asyncio.run(provision(bench, [f"{prefix}{i}" for prefix in (device_prefix, latency_prefix) for i in range(DEVICES)],
                          device_type="bench"))
    asyncio.run(_preload(bench, device_prefix, messages))

    def delete_rows() -> None:
        asyncio.run(_sql(bench.tsdb_dsn, "DELETE FROM sensor_measurements WHERE device_id LIKE $1", device_prefix + "%"))

    raw_cpu = time.process_time()
    raw_rate = asyncio.run(_baseline(bench, messages))
    raw_cpu = time.process_time() - raw_cpu
    delete_rows()
    if peers:
        quix_rate = _quix_rate(bench, messages)
        floor_rate = _floor_rate(bench, messages, "agent")
        batch_floor_rate = _floor_rate(bench, messages, "batch")
        delete_rows()

    with bench_worker(bench) as worker:
        started, worker_cpu = time.monotonic(), _cpu_s({worker.proc.pid})
        peak = 0
        while _received(worker) < messages:
            peak = max(peak, rss_kib(worker.proc.pid))
            time.sleep(0.5)
        iotflow_rate = messages / (time.monotonic() - started)
        worker_cpu = _cpu_s({worker.proc.pid}) - worker_cpu

        latency_rate = max(1.0, iotflow_rate / 2)
        latency_count = int(latency_rate * 20)
        asyncio.run(_preload(bench, latency_prefix, latency_count, rate=latency_rate))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = asyncio.run(_sql(bench.tsdb_dsn, "SELECT count(*) AS n FROM sensor_measurements WHERE device_id LIKE $1",
                                    latency_prefix + "%"))[0]["n"]
            if done >= latency_count:
                break
            time.sleep(0.5)
        worker.terminate()
    p = asyncio.run(_sql(
        bench.tsdb_dsn,
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50, percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS p99 "
        "FROM (SELECT extract(epoch FROM received_at - time) AS d FROM sensor_measurements WHERE device_id LIKE $1) s",
        latency_prefix + "%"))[0]
    return {
        "messages": messages,
        "raw_baseline_msgs_per_s": round(raw_rate),
        **({"faust_floor_msgs_per_s": round(floor_rate),
            "batch_floor_msgs_per_s": round(batch_floor_rate),
            "quix_msgs_per_s": round(quix_rate)} if peers else {}),
        "iotflow_msgs_per_s": round(iotflow_rate),
        "ratio": round(iotflow_rate / raw_rate, 3),
        **({"iotflow_vs_quix": round(iotflow_rate / quix_rate, 3),
            "floor_ratio": round(floor_rate / raw_rate, 3),
            "batch_floor_ratio": round(batch_floor_rate / raw_rate, 3)} if peers else {}),
        # CPU per message (all threads): steadier than msg/s on a machine whose speed moves.
        "raw_cpu_us_per_msg": round(raw_cpu / messages * 1e6, 1),
        "worker_cpu_us_per_msg": round(worker_cpu / messages * 1e6, 1),
        "worker_peak_rss_mib": round(peak / 1024, 1),
        "latency_rate_msgs_per_s": round(latency_rate),
        "latency_p50_s": round(float(p["p50"] or 0), 3),
        "latency_p99_s": round(float(p["p99"] or 0), 3),
    }


def _drain_rate(bench: Settings, messages: int, workers: int, env: dict[str, str]) -> tuple[float, float, float]:
    """Start ``workers`` workers of a fresh consumer group at once on the preloaded topic; messages/s
    from the first one ready until their accounts together have received every message, and the
    CPU seconds the workers and the stack's Kafka and PostgreSQL used meanwhile."""
    services = _service_pids(bench)
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(started_worker(bench, app_id=f"{bench.app_id}-x{workers}", env=env))
                   for _ in range(workers)]
        pids = {cast(subprocess.Popen, w.proc).pid for w in started}
        begun = None
        while True:
            for worker in started:
                worker.assert_running("while the group took the preload")
            answering = [w for w in started if _answers(w)]
            if begun is None and answering:
                begun, services_before = time.monotonic(), _cpu_s(services)
                workers_before = _cpu_s(pids)
            if begun is not None and sum(_received(w) for w in answering) >= messages:
                elapsed = time.monotonic() - begun
                return messages / elapsed, _cpu_s(pids) - workers_before, _cpu_s(services) - services_before
            time.sleep(0.5)


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _cpu_s(roots: set[int]) -> float:
    """CPU seconds (user + system) used so far by ``roots`` and every running process under them
    (PostgreSQL's backends are the postmaster's children)."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICKS_PER_S

    def under_a_root(pid: int) -> bool:
        while pid > 1:
            if pid in roots:
                return True
            pid = parents.get(pid, 0)
        return False

    return sum(cpu for pid, cpu in used.items() if under_a_root(pid))


def _service_pids(settings: Settings) -> set[int]:
    """The local stack's Kafka broker and PostgreSQL postmaster."""
    stack = stack_services(settings)
    kafka = read_pid(cast(Any, stack["kafka"]).pid_file)
    postmaster = cast(Any, stack["postgres"]).data / "postmaster.pid"
    pids = {kafka} if kafka else set()
    with contextlib.suppress(OSError, ValueError, IndexError):
        pids.add(int(postmaster.read_text().split()[0]))
    return pids


def _answers(worker: WorkerProcess) -> bool:
    try:
        return http_get_json(f"{worker.url}/health/live", timeout=2)[0] == 200
    except OSError:
        return False


def run_scaling(settings: Settings, messages: int, partitions: int) -> dict[str, object]:
    """One worker, then two (each a fresh consumer group), on the same preloaded topic of
    ``partitions`` partitions, in one run."""
    bench, run_id = fresh_run(settings, "benchx", topic_partitions=partitions)
    device_prefix = f"benchx{run_id}-"
    # Enough devices that the partitions carry about the same load (50 would leave some with twice
    # the devices of others, and the worker holding them would set the pace).
    asyncio.run(provision(bench, [f"{device_prefix}{i}" for i in range(SCALING_DEVICES)], device_type="bench"))
    asyncio.run(_preload(bench, device_prefix, messages, devices=SCALING_DEVICES))
    env = {"IOTFLOW_TOPIC_PARTITIONS": str(partitions)}
    figures: dict[str, object] = {"messages": messages, "partitions": partitions, "cores": os.cpu_count()}
    rates = {}
    for workers in (1, 2):
        asyncio.run(_sql(bench.tsdb_dsn, "DELETE FROM sensor_measurements WHERE device_id LIKE $1", device_prefix + "%"))
        rate, workers_cpu, services_cpu = _drain_rate(bench, messages, workers, env)
        rates[workers] = rate
        label = "one_worker" if workers == 1 else "two_workers"
        figures[f"{label}_msgs_per_s"] = round(rate)
        figures[f"{label}_cpu_us_per_msg"] = round(workers_cpu / messages * 1e6, 1)
        figures[f"{label}_kafka_and_postgres_cpu_us_per_msg"] = round(services_cpu / messages * 1e6, 1)
    figures["scaling"] = round(rates[2] / rates[1], 2)
    return figures


def run_soak(settings: Settings, messages: int, window_s: float) -> dict[str, object]:
    """One worker through ``messages`` preloaded messages with a dedup window of ``window_s``, so
    marks expire all along; its RSS sampled every 2 s, by how far through the messages it was."""
    bench, run_id = fresh_run(settings, "benchsoak")
    device_prefix = f"soak{run_id}-"
    asyncio.run(provision(bench, [f"{device_prefix}{i}" for i in range(DEVICES)], device_type="bench"))
    asyncio.run(_preload(bench, device_prefix, messages))
    samples: list[tuple[int, int, float]] = []  # (messages received, RSS in KiB, seconds since ready)
    with bench_worker(bench, env={"IOTFLOW_DEDUP_WINDOW_S": str(window_s)}) as worker:
        pid = cast(subprocess.Popen, worker.proc).pid
        started = time.monotonic()
        slowest, unanswered, received = 0.0, 0, 0
        while received < messages:
            worker.assert_running("during the soak")
            asked = time.monotonic()
            try:
                received = _received(worker)
            except OSError:  # no answer within 10 s: the loop was busy that long; ask again
                unanswered += 1
            slowest = max(slowest, time.monotonic() - asked)
            samples.append((received, rss_kib(pid), time.monotonic() - started))
            time.sleep(2.0)
        elapsed = time.monotonic() - started
        expired, held = worker.metric("iotflow_dedup_marks_expired_total"), worker.metric("iotflow_dedup_marks")
    by_tenth = {f"{10 * (i + 1)}%": round(next(rss for got, rss, _ in samples if got >= messages * (i + 1) / 10) / 1024, 1)
                for i in range(10)}
    by_minute = [round(next(rss for _, rss, at in samples if at >= minute * 60) / 1024, 1)
                 for minute in range(int(samples[-1][2] // 60) + 1)]
    first = max(rss for got, rss, _ in samples if got <= messages / 2)
    second = max(rss for got, rss, _ in samples if got > messages / 2)
    return {
        "messages": messages,
        "dedup_window_s": window_s,
        "msgs_per_s": round(messages / elapsed),
        "rss_mib_by_share_received": by_tenth,
        "rss_mib_each_minute": by_minute,
        "peak_rss_first_half_mib": round(first / 1024, 1),
        "peak_rss_second_half_mib": round(second / 1024, 1),
        "second_half_over_first": round(second / first, 3),
        "marks_expired": int(expired),
        "marks_held_at_end": int(held),
        "slowest_accounting_answer_s": round(slowest, 2),
        "accounting_requests_unanswered_in_10_s": unanswered,
    }
