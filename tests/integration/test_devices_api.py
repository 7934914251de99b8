"""The device registry API against a real worker and PostgreSQL: registration, queries, changes
with optimistic concurrency, soft delete, problem+json errors and the outbox events."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from iotflow import topics
from iotflow.settings import Settings
from iotflow import auth
from iotflow.testing import bearer, http_json, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def api(start_module_worker):
    """One worker for the module: these tests share it and keep to their own device ids."""
    worker, own = start_module_worker("devices-api")
    return Api(worker.url + "/api/v1/devices", own)


@dataclasses.dataclass(frozen=True)
class Api:
    url: str
    settings: Settings  # the module worker's own (topic prefix, app id)


def _call(method: str, url: str, body=None, **headers: str):
    """A request as an admin unless ``Authorization`` is given (None: no token at all)."""
    if "Authorization" not in headers:
        headers.update(bearer(Settings.from_env(), "admin"))
    elif headers["Authorization"] is None:
        del headers["Authorization"]
    return http_json(method, url, body, headers=headers)


def _outbox(settings, device_id: str) -> list[tuple[str, int]]:
    async def read() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
        try:
            rows = await conn.fetch("SELECT kind, (payload->'device'->>'version')::int AS version FROM device_outbox "
                                    "WHERE device_id = $1 ORDER BY seq", device_id)
            return [(r["kind"], r["version"]) for r in rows]
        finally:
            await conn.close()
    return asyncio.run(read())


def test_registering_twice_creates_one_device_and_a_contradiction_is_a_conflict(api, settings, run_id):
    body = {"id": f"reg-{run_id}", "name": "boiler room", "type": "thermo", "tags": ["b", "a", "a"],
            "firmware_version": "1.0.0"}
    status, headers, created = _call("POST", api.url, body)
    assert status == 201, created
    assert headers["Location"] == f"/api/v1/devices/reg-{run_id}"
    assert headers["ETag"] == '"1"' and headers["X-Request-ID"]
    assert (created["tags"], created["status"], created["version"]) == (["a", "b"], "active", 1)

    assert created.pop("mqtt")["password"]  # the device's MQTT password, in the first answer only
    status, _, again = _call("POST", api.url, body)
    assert (status, again) == (200, created)

    status, headers, problem = _call("POST", api.url, {**body, "type": "meter"})
    assert status == 409 and headers["Content-Type"].startswith("application/problem+json")
    assert problem["fields"] == ["type"] and problem["request_id"] == headers["X-Request-ID"]
    assert _outbox(settings, f"reg-{run_id}") == [("registered", 1)]


def test_a_bad_registration_names_every_field_and_value(api, run_id):
    status, headers, problem = _call("POST", api.url, {"id": "no spaces", "type": "t", "tags": ["ok", ""],
                                                   "colour": "red"}, **{"X-Request-ID": f"req-{run_id}"})
    assert status == 422 and headers["Content-Type"].startswith("application/problem+json")
    assert problem["request_id"] == f"req-{run_id}"
    found = {(e["field"], str(e["value"])) for e in problem["errors"]}
    assert found == {("id", "no spaces"), ("name", "None"), ("tags[1]", ""), ("colour", "red")}

    status, _, problem = _call("POST", api.url, b"{not json")
    assert status == 422 and problem["errors"][0]["field"] == "body"


def test_an_unknown_device_is_404(api, run_id):
    status, _, problem = _call("GET", f"{api.url}/nobody-{run_id}")
    assert status == 404 and problem["device_id"] == f"nobody-{run_id}"


def test_filters_and_cursor_pages_cover_each_matching_device_once(api, run_id):
    ids = [f"q-{run_id}-{i:02d}" for i in range(25)]
    for i, device_id in enumerate(ids):
        body = {"id": device_id, "name": device_id, "type": f"kind-{run_id}", "tags": ["fleet", f"row{i % 2}"],
                "firmware_version": "2.0" if i < 10 else "2.1", "status": "active" if i % 5 else "maintenance"}
        assert _call("POST", api.url, body)[0] == 201

    def every_page(query: str) -> list[str]:
        seen, cursor = [], None
        while True:
            url = f"{api.url}?{query}&limit=4" + (f"&cursor={cursor}" if cursor else "")
            status, _, page = _call("GET", url)
            assert status == 200, page
            assert len(page["items"]) <= 4
            seen += [d["id"] for d in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return seen

    assert every_page(f"type=kind-{run_id}") == ids
    assert every_page(f"type=kind-{run_id}&tag=row1&tag=fleet") == ids[1::2]
    assert every_page(f"type=kind-{run_id}&firmware_version=2.0") == ids[:10]
    assert every_page(f"type=kind-{run_id}&status=maintenance") == ids[::5]

    status, _, problem = _call("GET", f"{api.url}?limit=0&cursor=%25%25&colour=red")
    assert status == 422
    assert {e["field"] for e in problem["errors"]} == {"limit", "cursor", "colour"}


def test_a_change_against_a_stale_version_is_refused_with_412(api, settings, run_id):
    url = f"{api.url}/chg-{run_id}"
    _call("POST", api.url, {"id": f"chg-{run_id}", "name": "pump", "type": "pump"})

    status, headers, changed = _call("PATCH", url, {"name": "pump 2", "tags": ["x"]}, **{"If-Match": '"1"'})
    assert status == 200, changed
    assert (changed["name"], changed["tags"], changed["version"], headers["ETag"]) == ("pump 2", ["x"], 2, '"2"')

    status, _, problem = _call("PATCH", url, {"name": "lost update"}, **{"If-Match": '"1"'})
    assert status == 412 and problem["current_version"] == 2
    assert _call("GET", url)[2]["name"] == "pump 2"

    status, _, problem = _call("PATCH", url, {"id": "other", "version": 9})
    assert status == 422 and {e["reason"] for e in problem["errors"]} == {"cannot be changed"}
    status, _, problem = _call("PATCH", url, {"name": "x"}, **{"If-Match": "yesterday"})
    assert status == 422 and problem["errors"][0]["field"] == "If-Match"
    assert _outbox(settings, f"chg-{run_id}") == [("registered", 1), ("updated", 2)]


def test_delete_is_soft_keeps_the_row_and_the_id_cannot_come_back(api, settings, run_id):
    device_id = f"del-{run_id}"
    _call("POST", api.url, {"id": device_id, "name": "old", "type": "meter", "tags": ["gone"]})
    status, _, deleted = _call("DELETE", f"{api.url}/{device_id}", **{"If-Match": '"1"'})
    assert status == 200 and deleted["deleted_at"] is not None and deleted["version"] == 2

    assert _call("GET", f"{api.url}/{device_id}")[0] == 404
    assert _call("DELETE", f"{api.url}/{device_id}")[0] == 404
    assert device_id not in [d["id"] for d in _call("GET", f"{api.url}?tag=gone&limit=500")[2]["items"]]
    status, _, problem = _call("POST", api.url, {"id": device_id, "name": "old", "type": "meter", "tags": ["gone"]})
    assert status == 409 and problem["fields"] == ["deleted_at"]

    async def row() -> asyncpg.Record:
        conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
        try:
            return await conn.fetchrow("SELECT name, deleted_at FROM devices WHERE id = $1", device_id)
        finally:
            await conn.close()
    kept = asyncio.run(row())
    assert kept["name"] == "old" and kept["deleted_at"] is not None
    assert _outbox(settings, device_id) == [("registered", 1), ("deleted", 2)]


def test_each_change_reaches_device_events_and_the_registry_table_in_order(api, settings, run_id):
    device_id = f"ev-{run_id}"
    _call("POST", api.url, {"id": device_id, "name": "valve", "type": "valve"})
    _call("PATCH", f"{api.url}/{device_id}", {"status": "maintenance"})
    _call("DELETE", f"{api.url}/{device_id}")

    def state() -> dict | None:
        status, _, body = _call("GET", f"{api.url}/{device_id}/state")
        return body if status == 200 and body["events_applied"] == 3 else None

    applied = wait_for(state, timeout=60)
    assert applied, _call("GET", f"{api.url}/{device_id}/state")
    assert (applied["deleted"], applied["version"], applied["status"]) == (True, 3, "maintenance")

    async def events() -> list[dict]:
        consumer = AIOKafkaConsumer(topics.name(api.settings, topics.DEVICE_EVENTS),
                                    bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            found: list[dict] = []
            for _ in range(50):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found += [json.loads(m.value) | {"header": dict(m.headers)["iotflow-event-id"].decode()}
                              for m in records if m.key == device_id.encode()]
                if len(found) >= 3:
                    break
            return found
        finally:
            await consumer.stop()

    found = asyncio.run(events())
    assert [e["kind"] for e in found] == ["registered", "updated", "deleted"]
    assert [e["seq"] for e in found] == sorted(e["seq"] for e in found)
    assert all(e["event_id"] == e["header"] for e in found)
    assert [e["device"]["version"] for e in found] == [1, 2, 3]


def test_telemetry_comes_back_in_time_buckets(api, run_id):
    device_id = f"tel-{run_id}"
    _call("POST", api.url, {"id": device_id, "name": "thermo", "type": "thermo"})
    # On an even minute: buckets are aligned to an origin at midnight, so 2m buckets start there.
    base = (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)
    base -= timedelta(minutes=base.minute % 2)
    # Two minutes: temps 10, 20, 30 in the first, 40 in the second; a humidity reading alongside.
    items = [{"device_id": device_id, "msg_id": f"m{i}", "seq": i,
              "ts": int((base + timedelta(seconds=offset)).timestamp() * 1000),
              "metrics": {"temp": 10.0 * (i + 1), "hum": 50.0}} for i, offset in enumerate((0, 15, 30, 60))]
    status, _, body = _call("POST", api.url.replace("/devices", "/ingest"), items)
    assert status == 202, body

    start, end = base.isoformat(), (base + timedelta(minutes=2)).isoformat()
    url = f"{api.url}/{device_id}/telemetry?metric=temp&bucket=1m&from={quote(start)}&to={quote(end)}"

    def buckets() -> list | None:
        status, _, body = _call("GET", url)
        assert status == 200, body
        return body["buckets"] if sum(b["count"] for b in body["buckets"]) == 4 else None

    found = wait_for(buckets, timeout=60)
    assert [(b["count"], b["min"], b["max"], b["avg"]) for b in found] == [(3, 10.0, 30.0, 20.0), (1, 40.0, 40.0, 40.0)]
    assert found[0]["bucket"] == base.isoformat() and {b["metric"] for b in found} == {"temp"}

    def last_values() -> dict | None:
        status, _, body = _call("GET", f"{api.url}/{device_id}/state")
        return body["metrics"] if status == 200 and body["metrics"] else None

    latest = wait_for(last_values, timeout=30)
    assert latest == {"hum": {"value": 50.0, "time": (base + timedelta(seconds=60)).isoformat()},
                      "temp": {"value": 40.0, "time": (base + timedelta(seconds=60)).isoformat()}}

    status, _, body = _call("GET", f"{api.url}/{device_id}/telemetry?from={quote(start)}&to={quote(end)}&bucket=2m")
    assert status == 200 and [(b["metric"], b["count"]) for b in body["buckets"]] == [("hum", 4), ("temp", 4)]

    assert _call("GET", f"{api.url}/nobody-{run_id}/telemetry")[0] == 404
    status, _, problem = _call("GET", f"{api.url}/{device_id}/telemetry?bucket=fortnight")
    assert status == 422 and problem["errors"][0]["field"] == "bucket"


def test_every_api_request_needs_a_token_whose_role_allows_it(api, run_id):
    device_id = f"auth-{run_id}"
    settings = Settings.from_env()

    def as_role(role: str) -> str:
        return bearer(settings, role)["Authorization"]

    status, headers, problem = _call("GET", api.url, Authorization=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert problem["title"] == "Unauthorized" and "Authorization: Bearer" in problem["detail"]
    status, _, problem = _call("POST", api.url, {"id": device_id, "name": "n", "type": "t"},
                               Authorization=as_role("viewer"))
    assert status == 403 and (problem["role"], problem["needed"]) == ("viewer", "operator")
    assert _call("POST", api.url, {"id": device_id, "name": "n", "type": "t"},
                 Authorization=as_role("operator"))[0] == 201
    assert _call("GET", f"{api.url}/{device_id}", Authorization=as_role("viewer"))[0] == 200
    status, _, problem = _call("DELETE", f"{api.url}/{device_id}", Authorization=as_role("operator"))
    assert status == 403 and problem["needed"] == "admin"

    expired = auth.issue(settings.jwt_secret, role="admin", subject="old", ttl_s=60, issuer=settings.jwt_issuer,
                         audience=settings.jwt_audience, now=0)
    forged = auth.issue("x" * 40, role="admin", subject="mallory", ttl_s=60, issuer=settings.jwt_issuer,
                        audience=settings.jwt_audience)
    for token, reason in ((expired, "expired"), (forged, "not valid"), ("garbage", "not valid")):
        status, _, problem = _call("GET", api.url, Authorization=f"Bearer {token}")
        assert status == 401 and reason in problem["detail"], problem
    # Health needs no token.
    assert http_json("GET", api.url.replace("/api/v1/devices", "/health/live"))[0] == 200


def test_heartbeats_mark_a_device_online_and_reach_last_seen_in_postgresql(api, settings, run_id):
    device_id = f"hb-{run_id}"
    _call("POST", api.url, {"id": device_id, "name": "beacon", "type": "beacon"})

    async def beat() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            topic = topics.name(api.settings, topics.DEVICE_EVENTS)
            kind = [(topics.KIND_HEADER, b"heartbeat")]
            # One that names another device (refused, the stream goes on), then a good one.
            await producer.send_and_wait(topic, json.dumps({"device_id": "someone-else"}).encode(),
                                         key=device_id.encode(), headers=kind)
            await producer.send_and_wait(topic, json.dumps({"device_id": device_id, "ts": 1}).encode(),
                                         key=device_id.encode(), headers=kind)
        finally:
            await producer.stop()

    before = datetime.now(UTC)
    asyncio.run(beat())

    def online() -> dict | None:
        status, _, body = _call("GET", f"{api.url}/{device_id}/state")
        return body if status == 200 and body["online"] else None

    state = wait_for(online, timeout=60)
    assert state, _call("GET", f"{api.url}/{device_id}/state")
    seen = datetime.fromisoformat(state["last_seen"])
    assert before - timedelta(seconds=5) <= seen <= datetime.now(UTC)  # Kafka's clock, not the payload's ts=1

    async def last_seen_in_db():
        conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
        try:
            return await conn.fetchval("SELECT last_seen FROM devices WHERE id = $1", device_id)
        finally:
            await conn.close()

    assert wait_for(lambda: asyncio.run(last_seen_in_db()) == seen, timeout=60), asyncio.run(last_seen_in_db())
    assert _call("GET", f"{api.url}/{device_id}")[2]["version"] == 1  # presence is not a change of the device


def test_devices_are_found_by_a_piece_of_their_id_or_name_and_the_fleet_is_counted(api, run_id):
    for suffix, name in (("alpha", "Boiler Room"), ("beta", "roof 100%")):
        assert _call("POST", api.url, {"id": f"srch-{run_id}-{suffix}", "name": name, "type": "t"})[0] == 201

    def ids(q: str) -> list[str]:
        status, _, body = _call("GET", f"{api.url}?q={quote(q)}&limit=100")
        assert status == 200, body
        return [d["id"] for d in body["items"]]

    assert ids(f"srch-{run_id}-AL") == [f"srch-{run_id}-alpha"]  # any case
    assert f"srch-{run_id}-alpha" in ids("BOILER ROOM")  # names too (other tests' devices may share it)
    assert f"srch-{run_id}-beta" in ids("100%") and f"srch-{run_id}-alpha" not in ids("100%")  # % is a character
    assert ids(f"srch-{run_id}_") == []  # so is _
    status, _, problem = _call("GET", f"{api.url}?q=")
    assert status == 422 and problem["errors"][0]["field"] == "q"

    status, _, summary = _call("GET", api.url.replace("/devices", "/fleet/summary"))
    assert status == 200 and summary["live"] >= 2 and summary["live"] == summary["online"] + summary["offline"]
    assert summary["deleted"] >= 0
