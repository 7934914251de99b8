"""Faust's aiokafka transport with a cheaper hand-off from the fetcher to the streams.

Faust 0.15's fetcher hands every fetched record to the conductor through
``Service.wait_first(callback(message), suspend_flow.wait())``: two tasks and an ``asyncio.wait``
per record, so that a rebalance (which sets ``suspend_flow``) can abandon a delivery blocked on
a busy conductor. Profiled here, that is more than half of a no-op agent's time per message
(docs/performance.md). The conductor's callback returns at once unless the stream's buffer is
full, so this consumer awaits it directly and keeps ``wait_first`` for the cases known before the
call: flow suspended, or the conductor's callback table locked by a resubscription. A delivery
that waited on a full buffer through a rebalance (Faust's abandoned one would finish the same way,
in the background) must not move the read offset that the rebalance's seek has set; the consumer
generation tells; and one that the rebalance cancelled (clearing a stream's buffer cancels the puts
waiting on it) ends there, as Faust's separate delivery task would, not the fetcher. Everything
else the fetcher does is kept: reading offsets, dropping records below the read offset, recording
offset gaps for acking topics (so commits can pass transaction markers and compacted holes),
committing every ``broker_commit_every`` acks, and yielding to the loop every hundred records.

It also refuses a commit past an offset that was never acknowledged. Faust's ``_new_offset``
checks the head of the acknowledged offsets against the committed one with an off-by-one
(``min(acked) - committed > 1``: a single unacknowledged offset right after the committed one is
passed over) and skips the check while nothing was committed (offset 0 / None). iotflow leaves
offsets unacknowledged on purpose — telemetry waiting for its device's registration — so a crash
then would lose them. Here the head must be the committed offset itself (or the first offset
delivered since the assignment, when nothing was committed), unless recorded gaps (transaction
markers, compacted holes) cover the offsets between.

And it subscribes only once every topic is in the brokers' metadata. Faust creates the tables'
changelog topics just before subscribing; a topic created a moment before the group's leader
assigns is missing from its metadata, and Faust's assignor then leaves it out ("Ignoring missing
topic") until the next rebalance: that table's partitions have no owner — its views cannot be
routed and its changelog is not read — for as long as the metadata takes to refresh (minutes).

Tied to faust-streaming 0.15.x internals (setup.cfg pins ``<0.16``);
tests/integration/test_worker.py runs every worker through it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

import structlog
from aiokafka.errors import KafkaError

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from intervaltree import IntervalTree

from iotflow.kafka_admin import wait_visible

log = structlog.get_logger(__name__)

_YIELD_EVERY = 100  # records between chances for other tasks (health checks, timers)


def head_blocked(acked_head: int, expected: int | None, gaps: IntervalTree) -> bool:
    """Whether an offset between ``expected`` (the next offset a commit must cover) and the lowest
    acknowledged one, ``acked_head``, is neither acknowledged nor a recorded gap — so no commit may
    advance yet. ``expected`` None: nothing known to compare with (nothing delivered yet)."""
    if expected is None or acked_head <= expected:
        return False
    position = expected
    for interval in sorted(gaps.overlap(expected, acked_head), key=lambda i: i.begin):
        if interval.begin > position:
            return True
        position = max(position, interval.end)
    return position < acked_head


class Consumer(faust_aiokafka.Consumer):
    _first_delivered: dict[TP, int]

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if acked:
            expected = self._committed_offset[tp]
            if expected is None:
                expected = self._first_delivered.get(tp)
            if head_blocked(min(acked), expected, self._gap[tp]):
                return None
        return super()._new_offset(tp)

    async def subscribe(self, topics: Iterable[str]) -> None:
        names = sorted(set(topics))
        bootstrap = ",".join(f"{url.host}:{url.port or 9092}" for url in self.app.conf.broker)
        try:
            await wait_visible(bootstrap, names, self.app.conf.broker_request_timeout)
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            # Subscribing anyway is what Faust does: the group assigns what the metadata holds.
            log.warning("subscription_topics_not_visible", topics=names, error=repr(exc))
        await super().subscribe(names)

    async def perform_seek(self) -> None:
        self._first_delivered = {}  # a new assignment: reading starts again from the committed offsets
        await super().perform_seek()

    async def _drain_messages(self, fetcher: Any) -> None:  # the fetcher task's loop
        deliver = self.callback
        if not hasattr(self, "_first_delivered"):
            self._first_delivered = {}
        suspended = self.suspend_flow
        callback_lock = getattr(self.app.topics, "_tp_to_callback_lock", None)
        read_offsets = self._read_offset
        acking = self.app.topics.acks_enabled_for
        since_yield = 0
        current = asyncio.current_task()
        assert current is not None

        def stopping() -> bool:
            return self._stopped.is_set() or cast(Any, fetcher)._stopped.is_set()

        try:
            while not stopping():
                self.diag.set_flag(CONSUMER_FETCHING)
                records = self.getmany(timeout=1.0)
                await asyncio.sleep(0)
                if self.should_stop:
                    continue
                async for tp, message in records:
                    since_yield += 1
                    if since_yield >= _YIELD_EVERY:
                        since_yield = 0
                        await asyncio.sleep(0)
                    offset = message.offset
                    read = read_offsets[tp]
                    if read is not None and offset < read:
                        continue  # already delivered before a seek
                    if read and offset - read > 1 and acking(message.topic):
                        await self._add_gap(tp, read + 1, offset)
                    if tp not in self._first_delivered:
                        self._first_delivered[tp] = offset
                    if self._commit_every is not None and self._n_acked >= self._commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if suspended.is_set() or (callback_lock is not None and callback_lock.locked()):
                        await self.wait_first(deliver(message), suspended.wait())
                        read_offsets[tp] = offset
                        continue
                    generation = self.app.consumer_generation_id
                    try:
                        await deliver(message)
                    except asyncio.CancelledError:
                        if current.cancelling():
                            raise  # this task is being cancelled (the fetcher stops)
                        # A rebalance cleared the stream's full buffer and cancelled the delivery
                        # waiting on it (mode's ThrowableQueue.clear); Faust's own delivery task
                        # would have died alone. The message was not delivered: the seek to the
                        # committed offsets reads it again.
                        continue
                    if self.app.consumer_generation_id == generation:
                        read_offsets[tp] = offset
                    # else the delivery waited on a full stream buffer through a rebalance, whose
                    # seek to the committed offsets has set where reading goes on: keep that.
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if not self.transport.app.should_stop:
                raise
            self.log.info("Broker stopped consumer, shutting down...")
        except asyncio.CancelledError:
            if not self.transport.app.should_stop:
                raise
            self.log.info("Consumer shutting down for user cancel.")
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
