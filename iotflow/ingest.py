"""The ingest pipeline: validate → DLQ, dedup, account, batch → sink → ack.

The handler of :meth:`IngestPipeline.deciding` is given each sensor-data message of a fetch in turn,
as the fetcher hands the fetch over (iotflow/agents/ingest.py): it reads the tables in that message's partition and queues its
rows and its table writes (a mark, the device's account — tagged with the message's partition) in a
bounded batch. A full batch is written in the background while the next one is decided (reads
see the batch's table writes until they are written; two batches at most are written at a time,
and deciding waits for the oldest before handing over another, so memory stays bounded);
:meth:`IngestPipeline.flush` (on a timer, on revocation and on stop) hands over what is queued and
waits until all is written. Each batch's write runs these steps:

1. its rows go through the idempotent sink at once — beside the previous batch's, on a connection
   of their own (retrying while the database is away: the agent blocks once two batches wait,
   backpressure, and Kafka keeps the backlog);
2. its marks, accounts and latest values — changelog records acknowledged by Kafka, then the local
   store (:class:`iotflow.tables.batched.TableBatch`), retried while Kafka refuses them — once the
   previous batch is written, so that each table's changelog and store take the batches in order;
3. once its rows and table writes are done and every DLQ record of the batch is confirmed by
   Kafka (acks=all), and the previous batch is acknowledged: its events are acknowledged, in
   order, so Faust may commit their offsets.

Nothing is acknowledged before it is durable (invariant 1); the sink's ON CONFLICT and the marks'
offsets make every replay harmless (invariants 2 and 3): a mark may reach the changelog before
its rows reach the database, and after a crash between the two the replayed message finds its own
offset in the mark — verdict ``replay``, written again — while another message with the same
msg_id is a duplicate. An invalid message costs one DLQ record, never the stream (invariant 4). A
device's account records the last offset it counted, so a replayed message is never counted twice.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import faust
import structlog
from faust.types import Message

from iotflow import metrics
from iotflow.dedup import (
    INVALID, REJECTED, DeviceAccount, ExpiryIndex, LatestValues, Mark, Verdict, dedup_key, verdict,
)
from iotflow.devices import DeviceStatus
from iotflow.errors import InvalidPayload, RegistryUnavailable, SinkRejected
from iotflow.parking import ParkingLot
from iotflow.sinks.timescale import MeasurementSink, Row
from iotflow.tables.batched import TableBatch, write_all
from iotflow.telemetry import Limits, Telemetry, parse

log = structlog.get_logger(__name__)

_DLQ_REPORT_EVERY_S = 10.0
_CONFIRM_TIMEOUT_S = 1.0  # a registry lookup for waiting devices: the agent waits this long at most
_CONFIRM_PAUSE_S = 5.0  # after a lookup failed: waiting devices are asked of the table only, meanwhile
_EXPIRE_PER_MESSAGE = 8  # marks deleted per message at most: expiry keeps pace without bursts
_EXPIRE_PER_TICK = 5_000  # marks deleted per partition and timer tick at most (partitions no message comes to)
_INDEX_CHUNK = 10_000  # marks indexed between two turns of the event loop
_WRITES_AT_ONCE = 2  # batches being written while the next one is decided


_Writes = dict[bytes, tuple[int, bytes | None]]  # a table's taken writes (TableBatch.take)


@dataclass
class _Pending:
    message: Message
    rows: list[Row] = field(default_factory=list)
    dlq: Awaitable[object] | None = None
    device_s: float = 0.0  # the device's ts, for the end-to-end latency


def _always(message: Message) -> bool:
    return True


class IngestPipeline:
    def __init__(
        self,
        *,
        sink: MeasurementSink,
        dlq: faust.TopicT,
        marks: TableBatch[Mark],
        accounts: TableBatch[DeviceAccount],
        latest: TableBatch[LatestValues],
        device_status: Callable[[int, bytes], DeviceStatus],
        parked: ParkingLot[Message],
        ack: Callable[[list[Message]], object],
        confirm: Callable[[list[bytes]], Awaitable[dict[bytes, DeviceStatus]]] | None = None,
        limits: Limits,
        batch_size: int,
        dedup_window_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self.dlq = dlq
        self.marks = marks
        self.accounts = accounts
        self.latest = latest
        self.device_status = device_status
        self.confirm = confirm
        self._confirm_resumes_at = float("-inf")
        self._parked = parked
        self.ack = ack  # a batch's rows are durable: Faust may commit its messages' offsets
        self.limits = limits
        self.batch_size = batch_size
        self.window_ms = int(dedup_window_s * 1000)
        self.clock = clock
        self._expiry = ExpiryIndex(self.window_ms)
        self._indexed = False
        self._assignment = 0  # assignments seen: an index built across one is out of date
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        # The batches being written while the next one is decided, oldest first; the last one's write
        # ends after all the others' (each waits for the one before it to acknowledge its own).
        self._writing: asyncio.Future[None] | None = None
        self._in_flight: deque[asyncio.Future[None]] = deque()
        self._order = asyncio.Lock()  # one message decided at a time: the agent's and the timer's
        self._closed = False
        self._outcomes: Counter[str] = Counter()  # decided since the last hand-off, by outcome label
        self._expired = 0  # marks deleted since the last hand-off
        self._dlq_unreported: Counter[str] = Counter()
        self._dlq_example: dict[str, object] = {}
        self._dlq_reported_at = float("-inf")
        # Per partition: Kafka's timestamp (s) of the newest message made durable (the lag metric).
        self.durable_until: dict[int, float] = {}
        # The expiry index holds every mark of the active partitions once it is built (at the first
        # message after an assignment); counting the store instead would read every key per scrape.
        metrics.DEDUP_MARKS.set_function(lambda: len(self._expiry))
        metrics.PARKED.set_function(lambda: len(self._parked))

    def on_partitions_assigned(self, assigned_partitions: set[int]) -> None:
        """Rebuild the expiry index at the next message: restored marks must expire too."""
        self._expiry.drop_partitions_except(assigned_partitions)
        self._indexed = False
        self._assignment += 1

    async def _index_restored_marks(self) -> None:
        """Index every mark of the active partitions (restored ones too), letting the event loop run
        every ``_INDEX_CHUNK`` marks: millions of marks take seconds, and the web server, the
        timers and Faust's own tasks must not stall that long. Deciding waits for it (the caller
        holds the order lock), so marks set meanwhile are those of the flush on the timer only."""
        started, assignment = time.monotonic(), self._assignment
        expiry, index = ExpiryIndex(self.window_ms), 0
        try:
            for index, (key, value) in enumerate(self.marks.table.items(), 1):
                expiry.add_restored(key, Mark.decode(value))
                if index % _INDEX_CHUNK == 0:
                    await asyncio.sleep(0)
        except RuntimeError as exc:  # the store's partitions changed under the pass: a rebalance began
            log.info("dedup_expiry_index_interrupted", marks=index, error=str(exc))
            return  # not indexed: the next message after the assignment starts over
        if assignment != self._assignment:
            return  # partitions were assigned meanwhile: the next message starts over
        # Marks not in the store yet (decided after a pass that was thrown away, or being written):
        # the pass read the store only.
        for key, mark in self.marks.unwritten():
            expiry.add_restored(key, mark)
        self._expiry, self._indexed = expiry, True
        log.info("dedup_expiry_indexed", marks=len(expiry), seconds=round(time.monotonic() - started, 3))

    def _expire(self, partition: int, now_ms: int, limit: int = _EXPIRE_PER_MESSAGE) -> None:
        for key in self._expiry.expired(partition, now_ms, limit):
            self.marks.delete(partition, key)
            self._expired += 1

    @contextlib.asynccontextmanager
    async def deciding(self, current: Callable[[Message], bool] = _always) -> AsyncIterator[Callable[[Message], Awaitable[bool]]]:
        """A handler for the messages of one fetch, to be given them one at a time, in order; it
        answers whether it decided the message. The order lock is taken once for them all (the
        timer's tick waits for the fetch), and each device's registry status is read once per fetch:
        its registration or deletion, which the devices agent applies meanwhile, counts from the
        next fetch on — the two topics are never ordered against each other anyway.

        ``current(message)`` says whether the message still belongs to this worker's assignment
        (the agent: its consumer generation is the current one and no rebalance has suspended the
        flow). It is asked again after the waits that can last seconds before a message is decided
        (rebuilding the expiry index; settling waiting devices, which may ask PostgreSQL or wait for
        the previous batch's write; a full parking lot): a message that a rebalance overtook there
        is left undecided — no table write of a partition that may be another worker's by then,
        no acknowledgement — and its partition's next owner reads it again."""
        async with self._order:
            statuses: dict[bytes, DeviceStatus] = {}
            read = self.device_status

            def status_of(partition: int, device_key: bytes) -> DeviceStatus:
                status = statuses.get(device_key)
                if status is None:
                    status = statuses[device_key] = read(partition, device_key)
                return status

            yield functools.partial(self._handle, status_of=status_of, current=current)

    async def handle(self, message: Message) -> bool:
        """Decide one message on its own (a fetch of one)."""
        async with self.deciding() as handle:
            return await handle(message)

    async def _handle(self, message: Message, status_of: Callable[[int, bytes], DeviceStatus],
                      current: Callable[[Message], bool]) -> bool:
        """Decide what one message is, queue its rows and table writes; flush when the batch is full.
        The caller holds the order lock. False: left undecided (stopping, or overtaken by a rebalance)."""
        if self._closed:
            return False  # stopping: left unacknowledged, so the partition's next owner reads it
        partition = message.partition
        now_ms = int(self.clock() * 1000)
        if not self._indexed:
            await self._index_restored_marks()
            if not current(message):
                return False
        self._expire(partition, now_ms)
        if self._parked.any_due(now_ms):
            await self._release_due(now_ms)  # may wait: PostgreSQL asked about devices, a batch's write
            if not current(message):
                return False
        while self._parked.full:
            # Backpressure: take no more until waiting devices are settled (registered, or
            # out of time); Kafka keeps the backlog meanwhile.
            due = self._parked.next_due_ms()
            await asyncio.sleep(max(0.0, (due or now_ms) - now_ms) / 1000 + 0.001)
            now_ms = int(self.clock() * 1000)
            await self._release_due(now_ms)
            await self.flush()  # the timer's flush waits for this lock meanwhile
            if not current(message):
                return False
        device_key: bytes = message.key or b""
        if self._parked.holds(device_key):
            # Behind its device's waiting messages, invalid ones too: a device's messages are
            # counted in offset order (its account is replay-safe by offset).
            self._park(device_key, message, now_ms)
        else:
            await self._decide(message, now_ms, status_of)
        if self._pending_rows >= self.batch_size or len(self._pending) >= 4 * self.batch_size:
            await self._write_behind()
        return True

    async def close(self) -> None:
        """At shutdown, before the final commit: decide no more messages, make the queued batch
        durable and acknowledge it (messages still buffered stay unacknowledged: replayed later)."""
        async with self._order:
            self._closed = True
        await self.flush()

    async def tick(self, active: Callable[[], bool] = lambda: True) -> None:
        """On the timer: settle the waiting devices whose time has come, expire marks, then flush.

        Each message expires marks of its own partition; a partition no message comes to (its
        devices quiet, or its backlog read before the others') would keep its marks until one does
        — seen: a 10M-message run held twice the window's marks at its end. The tick expires every
        active partition's due marks too (their deletes name their partitions) — only while
        ``active()`` (the agent: no rebalance has suspended the flow), so that no tombstone goes to a
        partition being revoked."""
        async with self._order:
            if not self._closed:
                now_ms = int(self.clock() * 1000)
                await self._release_due(now_ms)
                # Else a pass over the store rebuilds the index at the next message.
                if self._indexed and active():
                    for partition in self._expiry.partitions():
                        self._expire(partition, now_ms, _EXPIRE_PER_TICK)
        await self.flush()
        self._report_dlq(time.monotonic())

    async def _decide(self, message: Message, now_ms: int, status_of: Callable[[int, bytes], DeviceStatus]) -> None:
        partition = message.partition
        device_key: bytes = message.key or b""
        account = self.accounts.get(partition, device_key) or DeviceAccount()
        counted = account.already_counted(message.offset)
        pending = _Pending(message)
        try:
            telemetry = parse(message.value, self.limits)
        except InvalidPayload as exc:
            pending.dlq = await self._send_to_dlq(message, "invalid", exc.field, str(exc))
            outcome: Verdict | str = INVALID
        else:
            if telemetry.device_id.encode() != device_key:
                # The key is the device the MQTT topic names (the bridge sets it; the broker lets a
                # device publish under its own topic only): a payload naming another is a spoof.
                reason = (f"the payload names device {telemetry.device_id!r}, the message came from "
                          f"{device_key.decode(errors='replace')!r}")
                pending.dlq = await self._send_to_dlq(message, "identity_mismatch", "device_id", reason)
                outcome = REJECTED
            else:
                outcome = self._decide_valid(message, telemetry, pending, now_ms, status_of)
                if outcome is None:
                    return  # parked
                if isinstance(outcome, DeviceStatus):  # deleted, or never registered in time
                    reason = (f"device {telemetry.device_id!r} was deleted" if outcome is DeviceStatus.DELETED else
                              f"device {telemetry.device_id!r} is not registered "
                              f"(waited {self._parked.wait_ms / 1000:g} s for its registration)")
                    pending.dlq = await self._send_to_dlq(message, outcome.value, "device_id", reason)
                    outcome = REJECTED
        if not counted:
            account.count(outcome, message.offset, now_ms, None if outcome in (INVALID, REJECTED) else telemetry.seq)
            self.accounts.set(partition, device_key, account)
        self._outcomes[_outcome_label(outcome) if not counted else "replay"] += 1
        self._pending.append(pending)
        self._pending_rows += len(pending.rows)

    def _decide_valid(self, message: Message, telemetry: Telemetry, pending: _Pending, now_ms: int,
                      status_of: Callable[[int, bytes], DeviceStatus]) -> Verdict | DeviceStatus | None:
        """The verdict on a valid message from its own device; None when it was parked; the device's
        status when it is not registered (the caller sends the message to the DLQ)."""
        partition, device_key = message.partition, message.key or b""
        status = status_of(partition, device_key)
        if status is DeviceStatus.UNKNOWN:
            self._park(device_key, message, now_ms)
            return None
        if status is not DeviceStatus.REGISTERED:
            return status
        key = dedup_key(telemetry.device_id, telemetry.msg_id)
        outcome = verdict(self.marks.get(partition, key), partition, message.offset)
        if outcome is Verdict.NEW:
            mark = Mark(partition, message.offset, now_ms)
            self.marks.set(partition, key, mark)
            self._expiry.add(key, mark)
        if outcome is not Verdict.DUPLICATE:
            pending.rows = telemetry.rows()
            pending.device_s = telemetry.time.timestamp()
            values = self.latest.get(partition, device_key) or LatestValues()
            values.update(telemetry.metrics, int(pending.device_s * 1000))
            self.latest.set(partition, device_key, values)
        return outcome

    def _park(self, device_key: bytes, message: Message, now_ms: int) -> None:
        self._parked.park(device_key, message.partition, message, now_ms)
        self._outcomes["parked"] += 1

    async def _release_due(self, now_ms: int) -> None:
        """Ask the registry again about waiting devices whose backoff has passed; settle the
        registered, the deleted and those out of time (every table read names its partition, so
        this may run while a message of any partition is handled).

        The registry table is asked first; devices it does not know yet are asked of PostgreSQL
        (``confirm``, one query for them all). The table learns a registration from the
        device-events stream, which the same fetcher delivers: when waiting telemetry fills the
        parking lot, deciding stops, and the fetcher, which waits for it, delivers no
        device-events either — a fleet registering while it sends would wait out its time and go
        to the DLQ (seen: 9,012 of 120,000 messages of 5,000 new devices)."""
        parked = self._parked
        if not parked.any_due(now_ms):
            return
        due = [key for key in parked.due(now_ms) if parked.holds(key)]  # else its partition was revoked
        statuses = {key: self.device_status(parked.partition_of(key), key) for key in due}
        unknown = [key for key, status in statuses.items() if status is DeviceStatus.UNKNOWN]
        if unknown:
            statuses.update(await self._confirm(unknown))
        for device_key in due:
            if not parked.holds(device_key):
                continue  # its partition was revoked meanwhile (forgotten, not acknowledged)
            status = statuses[device_key]
            if status is DeviceStatus.UNKNOWN:
                if not parked.expired(device_key, now_ms):
                    parked.retry_later(device_key, now_ms)
                    continue
                status = DeviceStatus.UNKNOWN_DEVICE
            await self._settle(device_key, now_ms, status)
            if self._pending_rows >= self.batch_size:
                await self._write_behind()

    async def _confirm(self, keys: list[bytes]) -> dict[bytes, DeviceStatus]:
        """What PostgreSQL says of ``keys``; nothing while it does not answer (they wait on)."""
        if self.confirm is None or time.monotonic() < self._confirm_resumes_at:
            return {}
        try:
            return await asyncio.wait_for(self.confirm(keys), _CONFIRM_TIMEOUT_S)
        except (RegistryUnavailable, asyncio.TimeoutError) as exc:
            # Not asked again for a while: the agent must not spend a timeout on every round.
            self._confirm_resumes_at = time.monotonic() + _CONFIRM_PAUSE_S
            log.info("registry_confirm_unavailable", devices=len(keys), error=repr(exc), paused_s=_CONFIRM_PAUSE_S)
            return {}

    async def _settle(self, device_key: bytes, now_ms: int, status: DeviceStatus) -> None:
        for message in self._parked.release(device_key):
            await self._decide(message, now_ms, lambda _partition, _key: status)

    def forget_partitions(self, revoked: set[int]) -> None:
        """Waiting messages of revoked partitions were never acknowledged: the next owner reads
        them again from Kafka."""
        self._expiry.drop_partitions(revoked)  # their marks are the next owner's to expire
        self._assignment += 1  # an index pass under way would bring them back: it starts over
        dropped = self._parked.forget_partitions(revoked)
        if dropped:
            log.info("unknown_device_messages_left_to_next_owner", messages=dropped)

    async def _send_to_dlq(self, message: Message, kind: str, field_name: str, reason: str) -> Awaitable[object]:
        headers = [
            ("iotflow-error", kind.encode()),
            ("iotflow-field", field_name.encode()),
            ("iotflow-reason", reason.encode()),
            ("iotflow-source-topic", message.topic.encode()),
            ("iotflow-source-partition", str(message.partition).encode()),
            ("iotflow-source-offset", str(message.offset).encode()),
        ]
        log.debug("message_to_dlq", kind=kind, field=field_name, reason=reason,
                  partition=message.partition, offset=message.offset)
        metrics.DLQ.labels(kind).inc()
        self._dlq_unreported[kind] += 1
        self._dlq_example = {"kind": kind, "field": field_name, "reason": reason[:200],
                             "partition": message.partition, "offset": message.offset}
        self._report_dlq(time.monotonic())
        return await self.dlq.send(key=message.key, value=message.value, headers=headers)

    def _report_dlq(self, now: float, *, force: bool = False) -> None:
        """One warning per ``_DLQ_REPORT_EVERY_S`` with the counts by kind and the latest example,
        not one per message (a flood of bad payloads must not flood the log)."""
        if self._dlq_unreported and (force or now - self._dlq_reported_at >= _DLQ_REPORT_EVERY_S):
            log.warning("messages_to_dlq", counts=dict(self._dlq_unreported), latest=self._dlq_example)
            self._dlq_unreported.clear()
            self._dlq_reported_at = now

    async def flush(self) -> None:
        """Make every message decided so far durable and acknowledged; return when it is."""
        self._hand_off()
        if self._writing is not None:
            await asyncio.shield(self._writing)  # a cancelled caller must not cut a write short

    async def _write_behind(self) -> None:
        """A full batch: hand it to a write of its own and go on deciding the next one. At most
        ``_WRITES_AT_ONCE`` batches are written while the next is decided: the caller waits here
        for the oldest, and is raised what it raised."""
        in_flight = self._in_flight
        while in_flight and in_flight[0].done():
            in_flight.popleft().result()
        while len(in_flight) >= _WRITES_AT_ONCE:
            await asyncio.shield(in_flight[0])
            in_flight.popleft()
        self._hand_off()

    def _hand_off(self) -> None:
        """Take the queued batch and its table writes (reads still see them) and start writing them."""
        batch, self._pending, self._pending_rows = self._pending, [], 0
        marks, accounts, latest = self.marks.take(), self.accounts.take(), self.latest.take()
        self._count_outcomes()
        if batch or marks:
            in_flight = self._in_flight
            while in_flight and in_flight[0].done():
                in_flight.popleft()  # written (what a failed one raised reaches the writes after it)
            self._writing = asyncio.ensure_future(self._write(batch, marks, accounts, latest, after=self._writing))
            in_flight.append(self._writing)

    def _count_outcomes(self) -> None:
        """The decisions since the last hand-off into their counters: one increment per outcome and
        batch, not one per message (each takes a lock)."""
        for label, count in self._outcomes.items():
            metrics.MESSAGES_BY_OUTCOME[label].inc(count)
        self._outcomes.clear()
        if self._expired:
            metrics.DEDUP_EXPIRED.inc(self._expired)
            self._expired = 0

    async def _write(self, batch: list[_Pending], marks: _Writes, accounts: _Writes, latest: _Writes, *,
                     after: asyncio.Future[None] | None) -> None:
        """The module docstring's steps for one batch: its rows at once, its table writes once the
        batch before it is written, its acknowledgement once both are done."""
        store = asyncio.ensure_future(self._store(batch))
        try:
            if after is not None:
                await after
            await write_all((self.marks, marks), (self.accounts, accounts), (self.latest, latest))
            for pending in batch:
                if pending.dlq is not None:
                    await pending.dlq
            await store
        except BaseException:
            # The batch before failed, or this one's table writes, DLQ records or rows did (its table
            # writes may have gone out: a replay finds its marks by offset): nothing is acknowledged.
            if store.done() and not store.cancelled():
                store.exception()  # retrieved: what is raised here is the earlier failure
            store.cancel()
            raise
        self.ack([pending.message for pending in batch])
        now, durable = time.time(), self.durable_until
        for pending in batch:
            message = pending.message
            if message.timestamp > durable.get(message.partition, 0.0):
                durable[message.partition] = message.timestamp
        metrics.observe_all(metrics.E2E_LATENCY, [now - pending.device_s for pending in batch if pending.rows])

    async def _store(self, batch: list[_Pending]) -> None:
        rows = [row for pending in batch for row in pending.rows]
        if not rows:
            return  # table writes only (expired marks, duplicates): no sink batch to count
        started = time.perf_counter()
        try:
            stored = await self.sink.write(rows)
        except SinkRejected as exc:
            log.error("sink_rejected_batch", rows=len(rows), error=str(exc))
            stored = await self._write_each(batch)
        metrics.SINK_BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.SINK_BATCH_ROWS.observe(len(rows))
        metrics.ROWS_STORED.inc(stored)

    async def _write_each(self, batch: list[_Pending]) -> int:
        """After a rejected batch: write message by message; what the database refuses goes to the DLQ."""
        stored = 0
        for pending in batch:
            if not pending.rows:
                continue
            try:
                stored += await self.sink.write(pending.rows)
            except SinkRejected as exc:
                await (await self._send_to_dlq(pending.message, "rejected", "rows", str(exc)))
        return stored


def _outcome_label(outcome: Verdict | str) -> str:
    return outcome.value if isinstance(outcome, Verdict) else outcome
