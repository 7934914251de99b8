"""Faust's ``table_route`` with a clear 503 while the owner of a key cannot be known yet, or is
not settled.

``table_route`` finds a key's owner through the app producer's partitioner, which needs the
producer's metadata for the table's changelog topic. Right after a worker starts (before the
warm-up in iotflow/tables/batched.py has loaded it) or around a rebalance, that metadata can be
missing and Faust fails with a TypeError deep in aiokafka — a 500. Here the metadata is checked
first: missing, the answer is 503 with ``Retry-After: 1`` and a reload is started, so the retry
is routed. A key that is not a device id (the partitioner hashes bytes; schemathesis found a 500
for a non-ASCII one) is refused with 422 before routing.

A request Faust's router keeps here is answered only if this worker is the settled, active owner
of the key's partition (:func:`answers_for`): around a rebalance the router's map and the
assignment disagree for a moment, and a partition just taken over is still being restored — the
local store would say "no such device" for one that exists (a third worker joining and leaving
under load showed hundreds of such 404s: tests/reliability/test_rebalances.py). A request that
arrives during a rebalance waits up to ``SETTLE_WAIT_S`` for it to end (before routing, so the
router's map is the new one, and on the owner); only then is the answer 503 with
``Retry-After: 1``.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

import aiohttp
import faust
import structlog
from faust.exceptions import NotReady
from faust.types import TP
from faust.web.exceptions import ServiceUnavailable
from faust.web import Request, Response, View

from iotflow.telemetry import DEVICE_ID
from iotflow.web.problems import problem

log = structlog.get_logger(__name__)

Handler = Callable[..., Awaitable[Response]]

# How long a table-routed request waits for a rebalance (and the restore after it) to end, on the
# worker asked and again on the owner, before answering 503 with Retry-After: a rebalance of a
# few workers takes 1-3 s here, so a read arriving during one is answered late rather than refused.
SETTLE_WAIT_S = 2.5
# The owner's answer (a forward, or this worker's own handler) is awaited this long at most: a
# worker that is shutting down can accept a forwarded request and never answer it.
ROUTED_TIMEOUT_S = SETTLE_WAIT_S + 2.5


def table_route(app: faust.App, table: faust.Table, match_info: str) -> Callable[[Handler], Handler]:
    routed_by_faust = app.table_route(table=table, match_info=match_info)
    topic = table.changelog_topic.get_topic_name()

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def settled(view: View, request: Request, *args: Any, **kwargs: Any) -> Response:
            # Faust's router sent the request here, but around a rebalance its map and this
            # worker's assignment disagree for a moment, and a partition just taken over is being
            # restored: the local store would answer "not found" (or an old value) for a key that
            # exists. Only the settled, active owner answers, after waiting a moment for the
            # rebalance to end; anyone else asks for a retry.
            key = request.match_info.get(match_info, "").encode()
            if not await _until(lambda: answers_for(app, table, key), SETTLE_WAIT_S):
                return _retry_soon(view, request, "Table partition moving",
                                   f"this worker does not hold the partition of {topic} for this key settled "
                                   "(rebalancing or restoring); retry")
            return await handler(view, request, *args, **kwargs)

        routed = routed_by_faust(settled)

        @wraps(handler)
        async def guarded(view: View, request: Request, *args: Any, **kwargs: Any) -> Response:
            key = request.match_info.get(match_info, "")
            if not DEVICE_ID.fullmatch(key):
                return problem(view, request, 422, "Invalid device id", f"{key!r} is not a device id",
                               errors=[{"field": match_info, "value": key,
                                        "reason": "letters, digits and _.:- only, 1-128 characters"}])
            producer = getattr(app.producer, "_producer", None)  # aiokafka's, once Faust started it
            if producer is None or producer._metadata.partitions_for_topic(topic) is None:
                reload_changelog_metadata(app, table)
                return _retry_soon(view, request, "Table owner not known yet",
                                   f"this worker has no partition metadata for {topic} yet; retry")
            # During a rebalance the router's map is the old one: wait (a moment) for the new one.
            await _until(lambda: not (app.rebalancing or app.in_recovery), SETTLE_WAIT_S)
            try:
                response = await asyncio.wait_for(routed(view, request, *args, **kwargs), ROUTED_TIMEOUT_S)
                if response.status >= 500 and response.status != 503:
                    # Only a forwarded answer arrives as a 5xx response (this worker's own errors are
                    # exceptions): the owner Faust picked could not answer — retry, as for 503.
                    log.warning("table_route_forward_failed", topic=topic, status=response.status)
                    return _retry_soon(view, request, "Table owner did not answer",
                                       f"the worker owning this key answered {response.status}")
                if response.status == 503 and "Retry-After" not in response.headers:
                    response.headers["Retry-After"] = "1"  # Faust's forwarding keeps the body, not the headers
                return response
            except (KeyError, TypeError, NotReady, ServiceUnavailable, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # Faust's router before its assignment metadata is complete (seen in the first
                # second after "Worker ready"), or the owner not answering: logged, and a retry.
                log.exception("table_route_failed", topic=topic, error=repr(exc))
                return _retry_soon(view, request, "Table owner not reachable yet", repr(exc))

        return guarded

    return decorate


def answers_for(app: faust.App, table: faust.Table, key: bytes) -> bool:
    """Whether this worker may answer for ``key`` of ``table`` from its own store now: the key's
    changelog partition is assigned to it, and not as a standby (the assignor's actives list
    source topics; a table's changelog partitions come with them), and it is neither rebalancing
    nor restoring tables."""
    if app.rebalancing or app.in_recovery:
        return False
    tp = _changelog_tp(app, table, key)
    return tp in app.consumer.assignment() and tp not in app.assignor.assigned_standbys()


def key_partition(app: faust.App, table: faust.Table, key: bytes) -> int:
    """The partition of ``table`` that holds ``key`` (the router's own lookup). The device tables
    are all keyed by device id with the same partition count, so one answer serves them all."""
    return _changelog_tp(app, table, key).partition


def _changelog_tp(app: faust.App, table: faust.Table, key: bytes) -> TP:
    return app.producer.key_partition(table.changelog_topic.get_topic_name(), key)  # a TP, not an int


async def _until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Whether ``condition`` holds within ``timeout_s`` (checked every 50 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _retry_soon(view: View, request: Request, title: str, detail: str) -> Response:
    response = problem(view, request, 503, title, detail)
    response.headers["Retry-After"] = "1"
    return response


def reload_changelog_metadata(app: faust.App, table: faust.Table) -> None:
    """Start loading the producer's metadata of ``table``'s changelog (what routing needs)."""
    producer = getattr(app.producer, "_producer", None)
    if producer is not None:
        app.add_future(_reload(producer, table.changelog_topic.get_topic_name()))


async def _reload(producer: Any, topic: str) -> None:
    try:
        await producer.partitions_for(topic)
    except Exception as exc:  # noqa: BLE001 - the next request tries again
        log.info("changelog_metadata_reload_failed", topic=topic, error=repr(exc))
