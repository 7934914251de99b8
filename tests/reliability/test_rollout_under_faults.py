"""Issue 7, scenario 13: a 1,000-device rollout through two faults at once — the leader worker
SIGKILLed and the bridge SIGKILLed (restarted 2 s later with the same MQTT session) once a fifth of
the fleet has its command. The rollout must complete on the surviving worker, every device must
see one command id and install once: status reports queued in Mosquitto while the bridge was down
reach Kafka after it is back, and the new leader re-publishes only the same command ids."""
from __future__ import annotations

import json
import time

import pytest

from iotflow.testing import http_json, wait_for
from tests.integration.test_mqtt_path import start_bridge
from tests.integration.test_rollouts import rig  # noqa: F401 - the fixture
from tests.reliability.test_rollout_leader_kill import _status, _unfinished

DEVICES = 1000
BRIDGE_DOWN_S = 2.0


@pytest.mark.timeout(900)
def test_a_thousand_device_rollout_completes_through_a_leader_kill_and_a_bridge_kill(rig, tmp_path, chaos):  # noqa: F811
    r = rig(DEVICES, workers=2, heartbeat_s=5.0)
    rollout = r.create({"firmware": r.publish("5.0.0"), "targets": {"devices": r.ids},
                        "waves": {"percent": [10, 100]}, "health_window_s": 0, "dispatch_per_s": 100})
    assert wait_for(lambda: r.counter.total() >= DEVICES // 5, timeout=300)
    leader = next(w for w in r.workers if http_json("GET", f"{w.url}/health/ready")[2].get("leader"))
    r.worker = next(w for w in r.workers if w is not leader)
    at_kill = r.counter.total()
    leader.kill()
    r.bridge.kill()
    r.bridge.wait(timeout=10)
    time.sleep(BRIDGE_DOWN_S)  # the outage itself: devices' reports wait in Mosquitto meanwhile
    killed_at = time.monotonic()
    r.bridge = start_bridge(r.settings, tmp_path, f"bridge-{r.run_id}")  # same client id: same session

    answers: dict[str, int] = {}
    ended = wait_for(lambda: _status(r, rollout["id"], answers) in {"completed", "aborted", "canceled"}, timeout=600)
    recovery_s = time.monotonic() - killed_at
    done = r.rollout(rollout["id"])
    assert ended and done["status"] == "completed" and done["by_state"] == {"SUCCEEDED": DEVICES}, json.dumps(
        {"rollout": {k: done.get(k) for k in ("status", "by_state")}, "answers": answers,
         "unfinished": dict(list(_unfinished(r, rollout["id"]).items())[:10])})
    # Each device saw one command id (the same id may be published again; a device applies it once).
    assert len(r.counter.by_device) == DEVICES
    assert {len(set(ids)) for ids in r.counter.by_device.values()} == {1}
    r.close()
    installs = [s["installs"] for s in r.summary["devices"].values()]
    chaos(fault=f"leader worker and bridge SIGKILL mid-rollout ({at_kill} of {DEVICES} commanded; bridge down "
                f"{BRIDGE_DOWN_S:g} s)", sent=DEVICES, stored=installs.count(1), lost=installs.count(0),
          duplicated=sum(n - 1 for n in installs if n > 1), recovery_s=round(recovery_s, 1))
    assert set(installs) == {1}
