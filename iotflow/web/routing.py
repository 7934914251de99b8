"""Faust's ``table_route`` with a clear 503 while the owner of a key cannot be known yet.

``table_route`` finds a key's owner through the app producer's partitioner, which needs the
producer's metadata for the table's changelog topic. Right after a worker starts (before the
warm-up in iotflow/tables/batched.py has loaded it) or around a rebalance, that metadata can be
missing and Faust fails with a TypeError deep in aiokafka — a 500. Here the metadata is checked
first: missing, the answer is 503 with ``Retry-After: 1`` and a reload is started, so the retry
is routed. A key that is not a device id (the partitioner hashes bytes; schemathesis found a 500
for a non-ASCII one) is refused with 422 before routing.
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
from faust.web.exceptions import ServiceUnavailable
from faust.web import Request, Response, View

from iotflow.telemetry import DEVICE_ID
from iotflow.web.problems import problem

log = structlog.get_logger(__name__)

Handler = Callable[..., Awaitable[Response]]


def table_route(app: faust.App, table: faust.Table, match_info: str) -> Callable[[Handler], Handler]:
    routed_by_faust = app.table_route(table=table, match_info=match_info)
    topic = table.changelog_topic.get_topic_name()

    def decorate(handler: Handler) -> Handler:
        routed = routed_by_faust(handler)

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
            try:
                response = await routed(view, request, *args, **kwargs)
                if response.status >= 500 and response.status != 503:
                    # Only a forwarded answer arrives as a 5xx response (this worker's own errors are
                    # exceptions): the owner Faust picked could not answer — retry, as for 503.
                    log.warning("table_route_forward_failed", topic=topic, status=response.status)
                    return _retry_soon(view, request, "Table owner did not answer",
                                       f"the worker owning this key answered {response.status}")
                return response
            except (KeyError, TypeError, NotReady, ServiceUnavailable, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # Faust's router before its assignment metadata is complete (seen in the first
                # second after "Worker ready"), or the owner not answering: logged, and a retry.
                log.exception("table_route_failed", topic=topic, error=repr(exc))
                return _retry_soon(view, request, "Table owner not reachable yet", repr(exc))

        return guarded

    return decorate


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
