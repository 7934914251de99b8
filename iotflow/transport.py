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
offset gaps for acking topics under ``exactly_once`` (so commits can pass transaction markers),
committing every ``broker_commit_every`` acks, and yielding to the loop every hundred records.

Without transactions an offset jump is not a gap: Faust's ``getmany`` can end a batch early (flow
stopped, generation changed, partition not read at that moment) after aiokafka's position passed
the rest, and Faust's fetcher then records the hole as a gap that commits pass — records nobody
processed (after a worker's ``SIGKILL``, the survivor lost a share of the firmware reports so:
tests/reliability/test_rollout_leader_kill.py). This fetcher seeks back to the first missing offset
instead, up to three times per offset (iotflow's source topics are not compacted, so only a log
truncated under the reader by retention is a real hole: it is accepted as a gap, with a warning,
after the third rewind to the same offset). Under ``exactly_once`` records are skipped the same way
(the likely cause of the exactly_once crash test's intermittent account under-count, with every row
stored: a range the killed worker had stored, skipped by its successor, committed past — its
accounts never counted it), so they are read again too; a topic written in transactions
also has offsets taken by transaction markers and aborted records: a jump over them comes back
the same three times and is then accepted as a gap, logged at info level. A batch cut short at a
partition's tail shows no jump until a later record arrives in that partition — maybe never (the
last firmware reports of a rollout). So after each batch the fetcher compares aiokafka's fetch
position of every source partition with the last offset delivered and rewinds the same way.

And it delivers nothing while Faust seeks to the committed offsets after a rebalance: the table
recovery resumes the flow and the partitions *before* that seek, so records fetched while it runs
would be read again from where it sets reading anyway. A partition nobody has committed yet is
read from its start again (Faust's seek leaves it where the fetcher got to), and the position
check counts such a partition as read up to offset -1, so it is read from the start even if that
seek failed. (:class:`FlowControl`, below, is the other half: what the streams were handed must
not be thrown away when the flow resumes.)

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

And it hands the records of topics registered with :func:`consume_in_batches` (sensor-data) to
their handler a fetch at a time, past the conductor: no ``Event``, no stream queue, no flow-control
queue per record — the per-record path that held a no-op Faust agent to about a quarter of a bare
aiokafka consumer here (docs/performance.md). Their read offsets move as they are handed over; the
records of a fetch made while a rebalance is under way (flow suspended) are not handed over, and
those the handler leaves undecided when a rebalance starts are read again after the new
assignment's seek, as records cleared from a stream's buffer are.

And its table recovery asks the brokers where each changelog ends (:class:`ConsumerThread`):
under ``exactly_once`` Faust read that from the last fetch response, which does not exist yet
right after an assignment, and restored empty tables.

Tied to faust-streaming 0.15.x internals (setup.cfg pins ``<0.16``);
tests/integration/test_worker.py runs every worker through it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message, TopicT
from faust.types.tuples import ack_lock
from intervaltree import IntervalTree
from mode.utils.futures import notify
from mode.utils.queues import FlowControlEvent

from iotflow.kafka_admin import wait_visible

log = structlog.get_logger(__name__)

_YIELD_EVERY = 100  # records between chances for other tasks (health checks, timers)
REWINDS_PER_OFFSET = 3  # seeks back to one missing offset before it is taken for a truncated log
_BATCH_MAX = 2000  # records of batch-consumed topics handed over at once at most

BatchHandler = Callable[[list[Message]], Awaitable[None]]


def batch_handlers_of(app: Any) -> dict[str, BatchHandler]:
    """Topic name → handler of the topics whose records the fetcher hands over a fetch at a time."""
    handlers = getattr(app, "_iotflow_batch_handlers", None)
    if handlers is None:
        handlers = app._iotflow_batch_handlers = {}
    return handlers


def consume_in_batches(app: Any, topic: TopicT, handler: BatchHandler) -> None:
    """Subscribe ``topic`` through Faust's conductor (its partitions are assigned, paused, sought and
    committed like any agent's), but have the fetcher hand its records to ``handler`` in fetch order,
    a fetch (at most ``_BATCH_MAX`` records) per call, instead of an ``Event`` per record through the
    conductor and a stream. ``handler`` tracks and acknowledges the records through Faust's consumer
    (:meth:`Consumer.track_handed_over`, :meth:`Consumer.ack_all`); the fetcher waits for it
    (backpressure)."""
    app.topics.add(topic)
    for name in topic.topics:
        batch_handlers_of(app)[name] = handler


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


def rewind_count(previous: tuple[int, int] | None, missing_from: int) -> int:
    """How many times in a row reading a partition will have gone back to ``missing_from``,
    counting this time; ``previous`` is the partition's last rewind (offset, count). Past
    ``REWINDS_PER_OFFSET`` the offsets are taken for a hole in the log."""
    if previous is not None and previous[0] == missing_from:
        return previous[1] + 1
    return 1


def passed_undelivered(read: int | None, position: int | None) -> bool:
    """Whether the consumer's fetch ``position`` (the next offset it will fetch) has passed offsets
    after ``read`` (the last delivered) that were never delivered. None: nothing to compare."""
    return read is not None and position is not None and position > read + 1


def _report(transactional: bool, event: str, **fields: Any) -> None:
    """A rewind or an accepted gap: a warning without transactions (skipped records, a truncated
    log), routine under ``exactly_once`` (transaction markers take offsets of transactional topics)."""
    (log.info if transactional else log.warning)(event, **fields)


class FlowControl(FlowControlEvent):
    """Faust's ``app.flow_control`` without the clearing of every stream's buffer on ``resume``.

    mode's ``FlowControlEvent.resume`` empties the queues it manages. Faust suspends and clears
    them itself when partitions are revoked, and seeks to the committed offsets afterwards, so
    the clear on resume adds nothing there — but the table recovery resumes twice (once when it
    starts or finds nothing to restore, once when it completes), and the second resume threw away
    records delivered since the first: read, never processed, never acknowledged. The partition's
    commits then stalled behind them, and their firmware reports were never applied (found in the
    rollout leader-kill test by logging every clear with its stack: ``on_recovery_completed`` →
    ``flow_control.resume()``)."""

    def resume(self) -> None:
        self._suspend.clear()
        self._resume.set()


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def _highwaters(self, partitions: list[TP]) -> dict[TP, int]:
        """Each partition's end as this consumer may read it, asked of the brokers.

        Faust asks aiokafka's ``last_stable_offset`` under ``exactly_once``: what the last fetch
        response said, ``None`` before any fetch of the partition — and the table recovery runs
        right after an assignment, before any. It took ``None`` for an empty changelog and restored
        nothing: a restarted exactly_once worker (which discards its RocksDB tables) started with
        empty tables whenever its changelogs had not been fetched yet — every account zero after the
        crash test's restarts. ``end_offsets`` sends a ListOffsets request with the consumer's
        isolation level: read_committed under ``exactly_once``, so it answers the last stable offset."""
        return dict(await self._ensure_consumer().end_offsets(partitions))


class Consumer(faust_aiokafka.Consumer):
    _first_delivered: dict[TP, int]

    _seeking = False
    # (consumer generation, source partitions without a committed offset) as of the last seek
    _never_committed: tuple[int, frozenset[TP]] = (-1, frozenset())

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def track_handed_over(self, message: Message) -> None:
        """Faust's ``track_message`` for a record handed to a batch handler, without its weak set
        of unacknowledged messages: that set serves only ``stream_wait_empty``, which iotflow
        turns off (app.py), and adding to and removing from it cost 2% of the ingest worker's time."""
        self._on_message_in(message.tp, message.offset, message)

    def ack_all(self, messages: Iterable[Message]) -> None:
        """Faust's ``Message.ack`` of every message, in order, under one hold of its lock — the
        ingest pipeline acknowledges a written batch at once, and one ack at a time (three
        acquisitions of the lock and the lookups around them) was 6% of its worker's time.
        The bookkeeping is Faust's ``Consumer.ack``'s; a message that streams still hold
        (``refcount``: never, for records handed to a batch handler) goes through Faust's own."""
        acking = self.app.topics.acks_enabled_for
        committed_offset, acked_index, acked = self._committed_offset, self._acked_index, self._acked
        discard = self._unacked_messages.discard
        with ack_lock:
            for message in messages:
                if message.acked:
                    continue
                if message.refcount > 0:
                    message.ack(self)
                    continue
                message.acked = True
                if not acking(message.topic):
                    continue
                tp, offset = message.tp, message.offset
                committed = committed_offset[tp]
                if committed is None or offset >= committed:
                    index = acked_index[tp]
                    if offset not in index:
                        discard(message)
                        index.add(offset)
                        acked[tp].append(offset)
                        self._n_acked += 1
            notify(self._waiting_for_ack)

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if acked:
            expected = self._committed_offset[tp]
            if expected is None:
                expected = self._first_delivered.get(tp)
            if head_blocked(min(acked), expected, self._gap[tp]):
                return None
        return super()._new_offset(tp)

    def _passed_tails(self, acking: Callable[[str], bool],
                      rewound: set[TP]) -> list[tuple[TP, int, int]]:
        """Source partitions whose fetch position has passed records never delivered, as
        (partition, last delivered offset, position). A batch cut short with no later record in
        the partition would not show the jump to the delivery loop. Read from aiokafka's fetch
        state (the consumer thread sets it while fetching, which has returned for this batch)."""
        try:
            assignment = self._thread._ensure_consumer()._subscription.subscription.assignment
        except AttributeError:
            return []  # no subscription yet, or one being replaced by a rebalance
        if assignment is None or not assignment.active:
            return []
        read_offsets = self._read_offset
        paused = self._paused_partitions  # Faust's own pause (table recovery): not read, nothing to compare
        generation, never_committed = self._never_committed
        if generation != self.app.consumer_generation_id:
            never_committed = frozenset()  # the last seek was for another assignment
        passed = []
        for tp in list(assignment.tps):
            if tp in rewound or not acking(tp.topic):
                continue
            state = assignment.state_value(tp)
            if state is None or not state.has_valid_position or state.paused:
                continue
            ftp = TP(tp.topic, tp.partition)
            if ftp in paused:
                continue
            read, position = read_offsets.get(ftp), state.position
            if read is None and ftp in never_committed and not self._committed_offset.get(ftp):
                read = -1  # nothing committed, nothing delivered: everything from the start is unread
            if passed_undelivered(read, position):
                passed.append((ftp, read, position))
        return passed

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
        self._seeking = True  # the fetcher delivers no source record until reading starts again from here
        try:
            self._first_delivered = {}  # a new assignment: reading starts again from the committed offsets
            await super().perform_seek()
            # Faust sets the read offset to the committed one, the offset to read *next*, where after a
            # delivery it holds the offset delivered: a first record one past it would not look like a
            # jump. Hold the offset before it, so the fetcher sees any record missing after the seek.
            read_offsets = self._read_offset
            never_committed = []
            for tp in self.assignment():
                read = read_offsets.get(tp)
                if read:
                    read_offsets[tp] = read - 1
                elif self.app.topics.acks_enabled_for(tp.topic) and not self._committed_offset.get(tp):
                    never_committed.append(tp)
            # Faust's seek leaves a partition nobody committed where the fetcher got to, past anything
            # fetched while the recovery had resumed the flow: read it from its start again.
            self._never_committed = (self.app.consumer_generation_id, frozenset(never_committed))
            if never_committed:
                try:
                    await self._thread.seek_to_beginning(*(TopicPartition(tp.topic, tp.partition)
                                                           for tp in never_committed))
                except IllegalStateError as exc:
                    # Revoked meanwhile (a rebalance seeks again); else the fetcher's check of its
                    # position against what it delivered reads them from the start.
                    log.warning("seek_to_beginning_failed", error=str(exc))
                    return
                for tp in never_committed:
                    read_offsets[tp] = None
        finally:
            self._seeking = False

    async def _drain_messages(self, fetcher: Any) -> None:  # the fetcher task's loop
        deliver = self.callback
        batch_handlers = batch_handlers_of(self.app)
        batch: list[Message] = []
        batch_handler: BatchHandler | None = None
        if not hasattr(self, "_first_delivered"):
            self._first_delivered = {}
        suspended = self.suspend_flow
        callback_lock = getattr(self.app.topics, "_tp_to_callback_lock", None)
        read_offsets = self._read_offset
        acking = self.app.topics.acks_enabled_for
        since_yield = 0
        current = asyncio.current_task()
        assert current is not None
        transactional = self.in_transaction  # exactly_once: transaction markers take offsets
        rewinds: dict[TP, tuple[int, int]] = {}  # per partition: last offset rewound to, how often

        def stopping() -> bool:
            return self._stopped.is_set() or cast(Any, fetcher)._stopped.is_set()

        async def rewind(tp: TP, read: int, upto: int, event: str) -> bool:
            """Offsets ``read + 1`` to ``upto - 1`` were passed undelivered: read them again (True),
            or, after ``REWINDS_PER_OFFSET`` tries, take them for a gap commits may pass (False)."""
            times = rewind_count(rewinds.get(tp), read + 1)
            if times <= REWINDS_PER_OFFSET:
                # The records between may have been fetched but never delivered (seen after a
                # takeover: Faust's getmany ends a batch early — flow stopped, generation changed,
                # partition not active — once aiokafka's position has passed them). A gap would let
                # commits pass them unprocessed: read them again; markers come back as the same jump.
                _report(transactional, event, topic=tp.topic, partition=tp.partition,
                        from_offset=read + 1, to_offset=upto, times=times)
                rewinds[tp] = (read + 1, times)
                rewound.add(tp)
                try:
                    await self.seek(tp, read + 1)
                except IllegalStateError:
                    return True  # revoked meanwhile: its next owner reads from the committed offset
                read_offsets[tp] = read if read >= 0 else None  # the last delivered: a record missing again shows
                return True
            # A log truncated under the reader, or (in transactional topics) markers.
            _report(transactional, "fetch_gap_accepted", topic=tp.topic, partition=tp.partition,
                    from_offset=read + 1, to_offset=upto)
            await self._add_gap(tp, read + 1, upto)
            return False

        rewound: set[TP] = set()
        try:
            while not stopping():
                self.diag.set_flag(CONSUMER_FETCHING)
                batch_generation = self.app.consumer_generation_id
                records = self.getmany(timeout=1.0)
                rewound = set()
                await asyncio.sleep(0)
                if self.should_stop:
                    continue
                async for tp, message in records:
                    if self._seeking and acking(tp.topic):
                        # Fetched before the seek: read again from where it sets reading. Only
                        # source partitions: the seek to committed offsets leaves the tables'
                        # changelogs (never committed) where they are, so a standby record skipped
                        # here would never be read — standbys stalled after each rebalance.
                        continue
                    since_yield += 1
                    if since_yield >= _YIELD_EVERY:
                        since_yield = 0
                        await asyncio.sleep(0)
                    offset = message.offset
                    read = read_offsets[tp]
                    if read is not None and offset < read:
                        continue  # already delivered before a seek
                    if tp in rewound:
                        continue  # read again from where it was rewound to
                    if read is not None and offset - read > 1 and acking(message.topic):
                        if await rewind(tp, read, offset, "fetch_rewound"):
                            continue
                    if tp not in self._first_delivered:
                        self._first_delivered[tp] = offset
                    if self._commit_every is not None and self._n_acked >= self._commit_every:
                        self._n_acked = 0
                        await self.commit()
                    handler = batch_handlers.get(tp.topic)
                    if handler is not None:
                        if suspended.is_set():
                            continue  # a rebalance is under way: not read (its seek reads it again)
                        if batch and handler is not batch_handler:
                            await cast(BatchHandler, batch_handler)(batch)  # another topic's handler
                            batch = []
                        batch.append(message)
                        batch_handler = handler
                        read_offsets[tp] = offset
                        if len(batch) >= _BATCH_MAX:
                            await batch_handler(batch)
                            batch = []
                        continue
                    if suspended.is_set() or (callback_lock is not None and callback_lock.locked()):
                        delivery = deliver(message)
                        waited = await self.wait_first(delivery, suspended.wait())
                        if delivery in waited.done:
                            read_offsets[tp] = offset
                        # else abandoned to the rebalance: not read (its seek, or a rewind, reads it)
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
                if batch:
                    assert batch_handler is not None
                    await batch_handler(batch)
                    batch = []
                if (self.flow_active and not suspended.is_set() and not stopping() and not self._seeking
                        and self.app.consumer_generation_id == batch_generation):
                    for tp, read, position in self._passed_tails(acking, rewound):
                        if not await rewind(tp, read, position, "fetch_tail_rewound"):
                            read_offsets[tp] = position - 1  # the gap is recorded: go on after it
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
