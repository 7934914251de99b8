"""Firmware rollouts end to end on the real stack: the worker's orchestrator commands simulated
devices over Mosquitto, their reports come back through the bridge and Kafka, and every command
the broker carried is counted by a subscriber of this test."""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from iotflow.mqtt_auth import account
from iotflow.simulator import FirmwareBehaviour, Fleet, FleetConfig, device_ids
from iotflow.testing import forget_device_accounts, forget_mqtt_session, http_json, mqtt_client, wait_for
from tests.integration.test_mqtt_path import start_bridge, wait_for_log

WORKER_ENV = {"IOTFLOW_ROLLOUT_TICK_S": "0.5", "IOTFLOW_LAST_SEEN_FLUSH_S": "1"}


class CommandCounter:
    """Every firmware command the broker delivers for devices starting with ``prefix``."""

    def __init__(self, settings, prefix: str) -> None:
        self.prefix = prefix
        self.by_device: dict[str, list[str]] = defaultdict(list)  # device → command ids, in arrival order
        self.first_at: float | None = None  # wall-clock time the first command arrived
        self.lock = threading.Lock()
        # The admin account may read every topic (no device's nor platform account may).
        self.client = mqtt_client(settings, f"count-{prefix}", account(settings, "admin"))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, reasons, p: reasons[0].is_failure or subscribed.set()
        self.client.on_message = self._on_message
        self.client.subscribe("devices/+/commands", qos=1)
        assert subscribed.wait(10), "the command counter could not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        device = message.topic.split("/")[1]
        if device.startswith(self.prefix):
            with self.lock:
                self.by_device[device].append(json.loads(message.payload)["command_id"])
                if self.first_at is None:
                    self.first_at = time.time()

    def total(self) -> int:
        with self.lock:
            return sum(len(ids) for ids in self.by_device.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Rig:
    """A worker, a bridge, a fleet answering commands in a thread, and a command counter."""

    def __init__(self, settings, start_worker, run_id: str, tmp_path: Path, devices: int, *,
                 heartbeat_s: float = 2.0, workers: int = 1, **behaviour: float) -> None:
        self.settings, self.run_id, self.closed = settings, run_id, False
        self.bridge = None
        self.counter: CommandCounter | None = None
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.summary: dict = {}
        self.created: list[str] = []  # rollout ids, ended at close (see close)
        try:
            self._start(start_worker, tmp_path, devices, heartbeat_s, workers, behaviour)
        except BaseException:
            self.close()  # nothing of a half-built rig outlives the test
            raise

    def _start(self, start_worker, tmp_path: Path, devices: int, heartbeat_s: float, workers: int,
               behaviour: dict) -> None:
        self.workers = [start_worker(**WORKER_ENV) for _ in range(workers)]
        for worker in self.workers:
            worker.wait_ready()
        self.worker = self.workers[0]
        self.admin = self.worker.bearer("admin")
        self.prefix = f"fw{self.run_id}"
        self.ids = device_ids(self.prefix, devices)
        self.counter = CommandCounter(self.settings, self.prefix)
        self.bridge = start_bridge(self.settings, tmp_path, f"bridge-{self.run_id}")
        wait_for_log(tmp_path / f"bridge-bridge-{self.run_id}.log", "mqtt_connected")
        self.fleet = Fleet(self.settings, FleetConfig(
            devices=devices, messages_per_device=None, rate_per_device=0.2, seed=11, prefix=self.prefix,
            heartbeat_s=heartbeat_s, firmware=FirmwareBehaviour(**{
                "version": self.version("1.0.0"), "step_s": 0.1, "reboot_s": 0.5, **behaviour})))
        self.thread = threading.Thread(target=lambda: self.summary.update(self.fleet.run(self.stop)), daemon=True)
        self.thread.start()
        # Registered (by the fleet) and connected before any rollout starts.
        assert wait_for(lambda: all(d.connected.is_set() for d in self.fleet.devices), timeout=180)

    def version(self, name: str) -> str:
        """A version of this test's own (the catalogue is shared, and a published version never changes)."""
        return f"{name}-{self.run_id}"

    def publish(self, name: str) -> str:
        version = self.version(name)
        body = {"version": version, "url": f"https://fw.example/{version}.bin", "size_bytes": 1024,
                "sha256": hashlib.sha256(version.encode()).hexdigest()}
        assert http_json("POST", f"{self.worker.url}/api/v1/firmware", body, headers=self.admin)[0] in (200, 201)
        return version

    def create(self, body: dict, key: str | None = None) -> dict:
        status, _, rollout = http_json("POST", f"{self.worker.url}/api/v1/firmware/rollouts", body,
                                       headers={**self.admin, "Idempotency-Key": key or uuid.uuid4().hex})
        assert status in (200, 201), rollout
        self.created.append(rollout["id"])
        return rollout

    def rollout(self, rollout_id: str) -> dict:
        status, _, body = http_json("GET", f"{self.worker.url}/api/v1/firmware/rollouts/{rollout_id}", headers=self.admin)
        assert status == 200, body
        return body

    def progress_as_counted(self, rollout_id: str, worker=None) -> dict | None:
        """The rollout-progress table's snapshot, served by ``worker`` (routed to the key's owner),
        if it says what PostgreSQL says now; else None (not there yet, or a tick behind)."""
        counted = self.rollout(rollout_id)
        status, _, snapshot = http_json("GET", f"{(worker or self.worker).url}/api/v1/firmware/rollouts/"
                                               f"{rollout_id}/progress", headers=self.admin)
        if status in (404, 503):
            return None
        assert status == 200, snapshot
        fields = ("status", "current_wave", "devices", "by_state", "unhealthy", "waves")
        return snapshot if all(snapshot[f] == counted[f] for f in fields) else None

    def wait_status(self, rollout_id: str, statuses: set[str], timeout: float) -> dict:
        assert wait_for(lambda: self.rollout(rollout_id)["status"] in statuses, timeout=timeout), self.rollout(rollout_id)
        return self.rollout(rollout_id)

    def executions(self, rollout_id: str) -> dict[str, dict]:
        async def read() -> dict[str, dict]:
            conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
            try:
                rows = await conn.fetch("SELECT device_id, wave, state, command_id, attempts, health "
                                        "FROM rollout_devices WHERE rollout_id = $1", uuid.UUID(rollout_id))
            finally:
                await conn.close()
            return {r["device_id"]: dict(r) for r in rows}
        return asyncio.run(read())

    def versions(self) -> dict[str, str]:
        async def read() -> dict[str, str]:
            conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
            try:
                rows = await conn.fetch("SELECT id, firmware_version FROM devices WHERE id = ANY($1::text[])", self.ids)
            finally:
                await conn.close()
            return {r["id"]: r["firmware_version"] for r in rows}
        return asyncio.run(read())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=180)
        if self.counter is not None:
            self.counter.close()
        if self.bridge is not None:
            self.bridge.terminate()
            self.bridge.wait(timeout=30)
            forget_mqtt_session(self.settings, f"bridge-{self.run_id}")
        forget_device_accounts(self.settings, self.ids)
        if self.created:
            asyncio.run(self._end_created())

    async def _end_created(self) -> None:
        """Cancel this test's rollouts that have not ended. The database is shared: a rollout left
        running would be ticked by every later test's orchestrator (its devices gone, it would
        time out and retry for ever), slowing their ticks and commanding devices of no test."""
        conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
        try:
            await conn.execute("UPDATE rollouts SET status = 'canceled', finished_at = now(), updated_at = now() "
                               "WHERE id = ANY($1::uuid[]) AND status IN ('scheduled', 'running', 'paused')",
                               [uuid.UUID(i) for i in self.created])
        finally:
            await conn.close()


@pytest.fixture
def rig(settings, start_worker, run_id, tmp_path):
    made: list[Rig] = []

    def make(devices: int, **kw) -> Rig:
        made.append(Rig(settings, start_worker, run_id, tmp_path, devices, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.timeout(900)
def test_a_thousand_devices_take_good_firmware_in_waves_once_each_from_ten_concurrent_requests(rig):
    r = rig(1000, heartbeat_s=5.0)
    version = r.publish("2.0.0")
    body = {"firmware": version, "targets": {"devices": r.ids}, "waves": {"percent": [1, 10, 50, 100]},
            "success_pct": 100, "health_window_s": 20, "dispatch_per_s": 400,
            "abort": {"failure_states": ["FAILED", "TIMED_OUT"], "threshold_pct": 5, "min_executed": 100}}
    with ThreadPoolExecutor(10) as pool:
        created = list(pool.map(lambda _: r.create(body, key=f"k-{r.prefix}"), range(10)))
    assert len({c["id"] for c in created}) == 1
    rollout_id = created[0]["id"]
    assert [w["size"] for w in created[0]["waves"]] == [10, 90, 400, 500]

    done = r.wait_status(rollout_id, {"completed", "aborted", "canceled"}, timeout=600)
    assert done["status"] == "completed", done
    assert done["by_state"] == {"SUCCEEDED": 1000} and done["unhealthy"] == 0, done
    # One command per device on the broker, and every device installed once.
    assert len(r.counter.by_device) == 1000 and {len(ids) for ids in r.counter.by_device.values()} == {1}
    executions = r.executions(rollout_id)
    assert all(r.counter.by_device[d] == [str(e["command_id"])] for d, e in executions.items())
    r.close()
    installs = {d: s["installs"] for d, s in r.summary["devices"].items()}
    assert set(installs.values()) == {1}, {d: n for d, n in installs.items() if n != 1}
    assert set(r.versions().values()) == {version}
    progress = r.worker.metric(f'iotflow_firmware_update_progress{{rollout_id="{rollout_id}",status="SUCCEEDED"')
    assert progress == 1000
    # The rollout view served from the rollout-progress table says the same as PostgreSQL.
    snapshot = wait_for(lambda: r.progress_as_counted(rollout_id), timeout=30)
    assert snapshot and snapshot["status"] == "completed" and snapshot["by_state"] == {"SUCCEEDED": 1000}, \
        (r.rollout(rollout_id), http_json("GET", f"{r.worker.url}/api/v1/firmware/rollouts/{rollout_id}/progress",
                                          headers=r.admin)[2])


@pytest.mark.timeout(600)
def test_bad_firmware_aborts_on_its_criteria_and_no_later_wave_gets_a_command(rig):
    r = rig(200, reboot_s=0.3, fail_ratio=0.2)
    rollout = r.create({"firmware": r.publish("2.0.1-bad"), "targets": {"devices": r.ids}, "waves": {"sizes": [50, 50, 100]},
                        "retries": 0, "health_window_s": 0, "dispatch_per_s": 100,
                        "abort": {"failure_states": ["FAILED"], "threshold_pct": 5, "min_executed": 20}})
    done = r.wait_status(rollout["id"], {"completed", "aborted", "canceled"}, timeout=300)
    assert done["status"] == "aborted" and "FAILED" in done["abort_reason"], done
    executions = r.executions(rollout["id"])
    aborting_wave = done["current_wave"]
    later = [d for d, e in executions.items() if e["wave"] > aborting_wave]
    assert later and all(executions[d]["state"] == "CANCELED" and executions[d]["command_id"] is None for d in later)
    time.sleep(2)  # ticks after the abort: still nothing for them on the broker
    assert not any(d in r.counter.by_device for d in later)


@pytest.mark.timeout(600)
def test_the_kill_switch_stops_dispatch_within_a_tick_and_resume_goes_on_where_it_stopped(rig):
    r = rig(100)
    kill = f"{r.worker.url}/api/v1/flags/rollouts.kill_switch"
    rollout = r.create({"firmware": r.publish("2.0.2"), "targets": {"devices": r.ids}, "waves": {"sizes": [100]},
                        "health_window_s": 0, "dispatch_per_s": 10})
    try:
        assert wait_for(lambda: r.counter.total() >= 10, timeout=60)
        assert http_json("PUT", kill, {"enabled": True}, headers=r.admin)[0] == 200
        time.sleep(1.0)  # one tick (0.5 s) may have been under way when the switch went on
        held = r.counter.total()
        time.sleep(3.0)  # six ticks
        assert r.counter.total() == held < 100
        assert r.rollout(rollout["id"])["status"] == "running"
    finally:
        assert http_json("PUT", kill, {"enabled": False}, headers=r.admin)[0] == 200
    done = r.wait_status(rollout["id"], {"completed", "aborted"}, timeout=300)
    assert done["status"] == "completed" and done["by_state"] == {"SUCCEEDED": 100}, done
    assert {len(ids) for ids in r.counter.by_device.values()} == {1} and len(r.counter.by_device) == 100


@pytest.mark.timeout(600)
def test_pause_holds_dispatch_and_cancel_ends_the_rollout(rig):
    r = rig(60)
    rollout = r.create({"firmware": r.publish("2.0.3"), "targets": {"devices": r.ids}, "waves": {"sizes": [60]},
                        "health_window_s": 0, "dispatch_per_s": 10})
    url = f"{r.worker.url}/api/v1/firmware/rollouts/{rollout['id']}"
    assert wait_for(lambda: r.counter.total() >= 5, timeout=60)
    status, _, paused = http_json("POST", url + "/pause", headers=r.admin)
    assert (status, paused["status"]) == (200, "paused")
    time.sleep(1.0)
    held = r.counter.total()
    time.sleep(2.0)
    assert r.counter.total() == held
    # The table-served view follows, live: paused, with the counts PostgreSQL has.
    assert wait_for(lambda: (p := r.progress_as_counted(rollout["id"])) and p["status"] == "paused", timeout=20)
    assert http_json("POST", url + "/resume", headers=r.admin)[2]["status"] == "running"
    assert wait_for(lambda: r.counter.total() > held, timeout=30)
    status, _, canceled = http_json("POST", url + "/cancel", headers=r.admin)
    assert (status, canceled["status"]) == (200, "canceled")
    assert canceled["by_state"].get("CANCELED", 0) > 0 and "QUEUED" not in canceled["by_state"]
    assert http_json("POST", url + "/resume", headers=r.admin)[0] == 409
    assert wait_for(lambda: (p := r.progress_as_counted(rollout["id"])) and p["status"] == "canceled", timeout=20)


@pytest.mark.timeout(600)
def test_devices_silent_after_success_fail_the_health_gate_and_abort_the_rollout(rig):
    r = rig(100, reboot_s=0.3, silent_ratio=0.3, heartbeat_s=1.0)
    rollout = r.create({"firmware": r.publish("2.0.4"), "targets": {"devices": r.ids}, "waves": {"sizes": [100]},
                        "health_window_s": 10, "dispatch_per_s": 100,
                        "abort": {"failure_states": ["FAILED"], "threshold_pct": 10, "min_executed": 20}})
    done = r.wait_status(rollout["id"], {"completed", "aborted"}, timeout=300)
    assert done["status"] == "aborted" and done["unhealthy"] > 0, done
    silent = {d.report.device_id for d in r.fleet.devices if d.silent}
    executions = r.executions(rollout["id"])
    failed_health = {d for d, e in executions.items() if e["health"] == "failed"}
    assert failed_health and failed_health <= silent


@pytest.mark.timeout(600)
def test_rollback_returns_the_devices_that_took_a_version_to_the_one_they_came_from(rig):
    r = rig(50)
    old, new = r.publish("1.0.0"), r.publish("3.0.0")
    first = r.create({"firmware": new, "targets": {"devices": r.ids}, "waves": {"sizes": [50]},
                      "health_window_s": 0, "dispatch_per_s": 100})
    assert r.wait_status(first["id"], {"completed", "aborted"}, timeout=300)["status"] == "completed"
    assert set(r.versions().values()) == {new}
    status, _, back = http_json("POST", f"{r.worker.url}/api/v1/firmware/rollouts/{first['id']}/rollback",
                                headers=r.admin)
    assert status == 201 and back["rollback_of"] == first["id"] and back["devices"] == 50, back
    again = http_json("POST", f"{r.worker.url}/api/v1/firmware/rollouts/{first['id']}/rollback", headers=r.admin)
    assert (again[0], again[2]["id"]) == (200, back["id"])  # one rollback per rollout
    assert r.wait_status(back["id"], {"completed", "aborted"}, timeout=300)["status"] == "completed"
    assert set(r.versions().values()) == {old}
    r.close()
    assert {s["firmware_version"] for s in r.summary["devices"].values()} == {old}
    assert {s["installs"] for s in r.summary["devices"].values()} == {2}


@pytest.mark.timeout(600)
def test_commands_go_out_only_inside_a_maintenance_window(rig):
    r = rig(30)
    opens = (datetime.now(UTC) + timedelta(seconds=15)).replace(microsecond=0)
    window = {"start": opens.strftime("%H:%M:%S"), "end": (opens + timedelta(hours=1)).strftime("%H:%M:%S"),
              "timezone": "UTC"}
    rollout = r.create({"firmware": r.publish("2.0.5"), "targets": {"devices": r.ids}, "waves": {"sizes": [10, 20]},
                        "health_window_s": 0, "dispatch_per_s": 100, "maintenance_windows": [window]})
    assert (rollout["window_open"], rollout["next_window_at"]) == (False, opens.isoformat()), rollout
    # Running, ticking every 0.5 s, and nothing goes out before the window opens.
    assert wait_for(lambda: r.rollout(rollout["id"])["status"] == "running", timeout=10)
    assert not wait_for(lambda: r.counter.total() > 0, timeout=max(0.0, opens.timestamp() - time.time() - 1))
    done = r.wait_status(rollout["id"], {"completed", "aborted"}, timeout=300)
    assert done["status"] == "completed" and done["by_state"] == {"SUCCEEDED": 30}, done
    assert done["window_open"] is True and done["next_window_at"] is None
    assert r.counter.first_at is not None and r.counter.first_at >= opens.timestamp()
