"""The audit log on a real worker and PostgreSQL: each mutating call that changed something is
recorded once, with who, what, when and its request id — retries with an Idempotency-Key and
repeated registrations included — append-only, and readable by admins only."""
from __future__ import annotations

import asyncio
import hashlib
import uuid

import asyncpg
import pytest

from iotflow.testing import bearer, http_json

pytestmark = pytest.mark.timeout(240)


def test_each_mutating_call_is_recorded_once_with_who_what_and_its_request_id(settings, start_worker, run_id):
    worker = start_worker()
    worker.wait_ready()
    api = f"{worker.url}/api/v1"
    admin, operator = f"admin-{run_id}", f"operator-{run_id}"
    done: list[tuple[str, str, str, str]] = []  # (actor, action, target_id, request id) as the calls went

    def call(method: str, path: str, body=None, *, who: str, role: str, expect: int, changed: bool,
             action: str = "", target: str = "", **headers: str) -> dict:
        request_id = uuid.uuid4().hex
        status, answer_headers, answer = http_json(method, api + path, body, timeout=30, headers={
            **bearer(settings, role, who), "X-Request-ID": request_id, **headers})
        assert status == expect, (method, path, answer)
        assert answer_headers["X-Request-ID"] == request_id
        if changed:
            done.append((who, action, target, request_id))
        return answer

    device, other = f"aud-{run_id}", f"aud-{run_id}-2"
    registration = {"id": device, "name": "boiler", "type": "thermo", "firmware_version": "1.0.0"}
    call("POST", "/devices", registration, who=operator, role="operator", expect=201, changed=True,
         action="device.register", target=device)
    call("POST", "/devices", registration, who=operator, role="operator", expect=200, changed=False)  # a repeat
    call("POST", "/devices", {**registration, "id": other}, who=operator, role="operator", expect=201, changed=True,
         action="device.register", target=other)
    call("PATCH", f"/devices/{device}", {"name": "boiler 2"}, who=operator, role="operator", expect=200,
         changed=True, action="device.update", target=device, **{"If-Match": '"1"'})
    call("PATCH", f"/devices/{device}", {"name": "stale"}, who=operator, role="operator", expect=412,
         changed=False, **{"If-Match": '"1"'})  # refused: nothing changed, nothing recorded
    version = f"9.9.9-{run_id}"
    firmware = {"version": version, "url": f"https://fw.example/{version}.bin", "size_bytes": 10,
                "sha256": hashlib.sha256(version.encode()).hexdigest()}
    call("POST", "/firmware", firmware, who=admin, role="admin", expect=201, changed=True,
         action="firmware.publish", target=version)
    call("POST", "/firmware", firmware, who=admin, role="admin", expect=200, changed=False)
    body = {"firmware": version, "targets": {"devices": [device, other]}, "health_window_s": 0, "dispatch_per_s": 1,
            "start_at": "2099-01-01T00:00:00Z"}
    key = f"aud-{run_id}"
    rollout = call("POST", "/firmware/rollouts", body, who=operator, role="operator", expect=201, changed=True,
                   action="rollout.create", **{"Idempotency-Key": key})
    done[-1] = (*done[-1][:2], rollout["id"], done[-1][3])
    call("POST", "/firmware/rollouts", body, who=operator, role="operator", expect=200, changed=False,
         **{"Idempotency-Key": key})  # the client's retry: the same rollout, not a second record
    call("POST", f"/firmware/rollouts/{rollout['id']}/pause", who=operator, role="operator", expect=200,
         changed=True, action="rollout.pause", target=rollout["id"])
    call("POST", f"/firmware/rollouts/{rollout['id']}/pause", who=operator, role="operator", expect=200,
         changed=False)  # already paused
    call("POST", f"/firmware/rollouts/{rollout['id']}/cancel", who=admin, role="admin", expect=200,
         changed=True, action="rollout.cancel", target=rollout["id"])
    flag = f"rollout:{rollout['id']}"
    call("PUT", f"/flags/{flag}", {"enabled": False}, who=admin, role="admin", expect=200, changed=True,
         action="flag.set", target=flag)
    call("DELETE", f"/devices/{other}", who=admin, role="admin", expect=200, changed=True,
         action="device.delete", target=other)

    mine = []
    for who in (operator, admin):
        page = call("GET", f"/audit?actor={who}&limit=500", who=admin, role="admin", expect=200, changed=False)
        assert page["next_before"] is None
        mine += page["items"]
    recorded = [(e["actor"], e["action"], e["target_id"], e["request_id"]) for e in sorted(mine, key=lambda e: e["id"])]
    assert recorded == done
    roles = {e["actor"]: e["role"] for e in mine}
    assert roles == {operator: "operator", admin: "admin"}
    update = next(e for e in mine if e["action"] == "device.update")
    assert update["details"] == {"changed": ["name"], "version": 2} and update["at"]

    # Paging and filters; admins only.
    first = call("GET", f"/audit?actor={operator}&limit=2", who=admin, role="admin", expect=200, changed=False)
    second = call("GET", f"/audit?actor={operator}&limit=2&before={first['next_before']}", who=admin, role="admin",
                  expect=200, changed=False)
    assert [e["id"] for e in first["items"] + second["items"]] == sorted(
        (e["id"] for e in mine if e["actor"] == operator), reverse=True)[:4]
    by_target = call("GET", f"/audit?target_type=device&target_id={device}", who=admin, role="admin", expect=200,
                     changed=False)
    assert [e["action"] for e in by_target["items"]] == ["device.update", "device.register"]
    call("GET", "/audit", who=operator, role="operator", expect=403, changed=False)
    problem = call("GET", "/audit?limit=0&colour=red", who=admin, role="admin", expect=422, changed=False)
    assert {e["field"] for e in problem["errors"]} == {"limit", "colour"}


def test_the_audit_log_refuses_to_be_changed(settings):
    async def tamper() -> list[str]:
        conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
        refused = []
        try:
            await conn.execute("INSERT INTO audit_log (actor, role, action, target_type, target_id) "
                               "VALUES ('test', 'system', 'test.tamper', 'test', 'x')")  # appending is allowed
            for sql in ("UPDATE audit_log SET actor = 'nobody'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
                try:
                    await conn.execute(sql)
                except asyncpg.InsufficientPrivilegeError as exc:
                    refused.append(str(exc))
        finally:
            await conn.close()
        return refused

    refused = asyncio.run(tamper())
    assert len(refused) == 3 and all("append-only" in r for r in refused), refused
