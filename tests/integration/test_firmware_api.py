"""The firmware catalogue API against a real worker and PostgreSQL: publish (idempotent, never
changed), read, list in pages, problem+json errors, roles."""
from __future__ import annotations

import asyncio
import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from iotflow.firmware import PAGE
from iotflow.settings import Settings
from iotflow.testing import http_json

pytestmark = pytest.mark.timeout(240)
TOMORROW = (datetime.now(UTC) + timedelta(days=1)).isoformat()


@pytest.fixture(scope="module")
def worker(start_module_worker):
    return start_module_worker("firmware-api")[0]


def release(version: str, **changes: object) -> dict:
    return {"version": version, "url": f"https://updates.example.com/{version}.bin", "size_bytes": 1_048_576,
            "sha256": hashlib.sha256(version.encode()).hexdigest(), **changes}


def call(worker, method: str, path: str, body=None, role: str = "operator"):
    return http_json(method, f"{worker.url}/api/v1/firmware{path}", body, headers=worker.bearer(role), timeout=30)


def test_publishing_is_idempotent_and_a_published_version_never_changes(worker):
    version = f"1.0.{uuid.uuid4().hex[:8]}"
    status, headers, body = call(worker, "POST", "", release(version))
    assert status == 201 and headers["Location"] == f"/api/v1/firmware/{version}"
    assert body["version"] == version and body["created_at"]
    again = call(worker, "POST", "", release(version))
    assert (again[0], again[2]) == (200, body)
    status, _, problem = call(worker, "POST", "", release(version, sha256="0" * 64, size_bytes=2))
    assert status == 409 and problem["fields"] == ["size_bytes", "sha256"]
    assert call(worker, "GET", f"/{version}", role="viewer")[2] == body


def test_every_bad_field_is_named_with_its_value(worker):
    status, headers, problem = call(worker, "POST", "", {"version": "bad version", "url": "ftp://x", "size_bytes": 0,
                                                          "sha256": "ABC", "extra": 1})
    assert status == 422 and headers["Content-Type"].startswith("application/problem+json")
    named = {(e["field"], str(e["value"])) for e in problem["errors"]}
    assert named == {("version", "bad version"), ("url", "ftp://x"), ("size_bytes", "0"), ("sha256", "ABC"),
                     ("extra", "1")}
    assert call(worker, "GET", "/no-such-version", role="viewer")[0] == 404


def test_the_catalogue_lists_in_pages_by_version(worker):
    prefix = f"9.{uuid.uuid4().hex[:6]}"
    versions = sorted(f"{prefix}.{i}" for i in range(3))
    for version in versions:
        assert call(worker, "POST", "", release(version))[0] == 201
    status, _, page = call(worker, "GET", f"?after={prefix}", role="viewer")
    assert status == 200 and [f["version"] for f in page["items"][:3]] == versions
    assert len(page["items"]) <= PAGE
    assert call(worker, "GET", "?after=not%20a%20version", role="viewer")[0] == 422


def test_viewers_read_and_only_operators_publish(worker):
    assert call(worker, "POST", "", release(f"2.0.{uuid.uuid4().hex[:8]}"), role="viewer")[0] == 403
    assert http_json("GET", f"{worker.url}/api/v1/firmware", timeout=10)[0] == 401


def register_fleet(worker, prefix: str, count: int, firmware: str | None = "1.0.0", tag: str = "fleet") -> list[str]:
    admin = worker.bearer("admin")
    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    for device_id in ids:
        body = {"id": device_id, "name": device_id, "type": "sensor", "tags": [tag], "firmware_version": firmware}
        assert http_json("POST", f"{worker.url}/api/v1/devices", body, headers=admin, timeout=30)[0] == 201
    return ids


def create(worker, body: dict, key: str, role: str = "operator"):
    return http_json("POST", f"{worker.url}/api/v1/firmware/rollouts", body, timeout=60,
                     headers={**worker.bearer(role), "Idempotency-Key": key})


def test_ten_concurrent_creates_with_one_key_make_one_rollout_with_every_device_once(worker):
    run = uuid.uuid4().hex[:8]
    version = f"3.0.{run}"
    assert call(worker, "POST", "", release(version))[0] == 201
    ids = register_fleet(worker, f"ro-{run}", 200, tag=f"t{run}")
    # Starting tomorrow: the worker's orchestrator (1 s ticks) leaves it as created while we look.
    body = {"firmware": version, "targets": {"filter": {"tags": [f"t{run}"]}}, "waves": {"percent": [1, 10, 50, 100]},
            "start_at": TOMORROW}
    key = f"key-{run}"
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: create(worker, body, key), range(10)))
    assert sorted(a[0] for a in answers) == [200] * 9 + [201]
    rollout_ids = {a[2]["id"] for a in answers}
    assert len(rollout_ids) == 1
    rollout = call(worker, "GET", f"/rollouts/{rollout_ids.pop()}", role="viewer")[2]
    assert rollout["devices"] == 200 and rollout["by_state"] == {"QUEUED": 200} and rollout["status"] == "scheduled"
    assert [w["size"] for w in rollout["waves"]] == [2, 18, 80, 100]  # 1% → 10% → 50% → 100% of 200

    async def rows() -> tuple[int, int]:
        conn = await asyncpg.connect(Settings.from_env().pg_dsn, timeout=10)
        try:
            return (await conn.fetchval("SELECT count(*) FROM rollouts WHERE idempotency_key = $1", key),
                    await conn.fetchval("SELECT count(DISTINCT device_id) FROM rollout_devices d JOIN rollouts r "
                                        "ON r.id = d.rollout_id WHERE r.idempotency_key = $1 AND d.device_id = ANY($2)",
                                        key, ids))
        finally:
            await conn.close()

    assert asyncio.run(rows()) == (1, 200)

    # The same key with another request is a misuse, not a second rollout.
    status, _, problem = create(worker, {**body, "retries": 5}, key)
    assert status == 422 and problem["rollout_id"] == rollout["id"]


def test_a_rollout_names_what_is_wrong_and_creates_nothing(worker):
    run = uuid.uuid4().hex[:8]
    version = f"4.0.{run}"
    assert call(worker, "POST", "", release(version))[0] == 201
    known = register_fleet(worker, f"rb-{run}", 2)
    status, _, problem = create(worker, {"firmware": version, "targets": {"devices": [*known, f"ghost-{run}"]}}, f"k1-{run}")
    assert status == 422 and problem["errors"][0]["field"] == "targets.devices"
    assert problem["errors"][0]["value"] == [f"ghost-{run}"]
    status, _, problem = create(worker, {"firmware": f"9.9.{run}", "targets": {"devices": known}}, f"k2-{run}")
    assert status == 422 and problem["errors"][0]["field"] == "firmware"
    status, _, problem = create(worker, {"firmware": version, "targets": {"devices": known}}, "")
    assert status == 422 and problem["errors"][0]["field"] == "Idempotency-Key"
    assert create(worker, {"firmware": version, "targets": {"devices": known}}, f"k3-{run}", role="viewer")[0] == 403
    assert call(worker, "GET", f"/rollouts/{uuid.uuid4()}", role="viewer")[0] == 404
    assert call(worker, "GET", "/rollouts/not-a-uuid", role="viewer")[0] == 404
    # Nothing was created by the refused requests (a retry with a fixed body may reuse those keys).
    status, _, created = create(worker, {"firmware": version, "targets": {"devices": known}, "start_at": TOMORROW},
                                f"k1-{run}")
    assert status == 201 and created["devices"] == 2
    listed = call(worker, "GET", "/rollouts?status=scheduled", role="viewer")[2]["items"]
    assert created["id"] in {r["id"] for r in listed}
