"""The expiry index of restored marks: rebuilt without stalling the event loop, thrown away when an
assignment happens during the pass, and what the ``iotflow_dedup_marks`` gauge reports."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from iotflow import metrics
from iotflow.dedup import Mark
from iotflow.ingest import _INDEX_CHUNK
from tests.unit.test_ingest_write_behind import rig

RESTORED = 3 * _INDEX_CHUNK + 7


def restored_marks(count: int = RESTORED, *, during=None):
    def items():
        for i in range(count):
            if during is not None and i == count // 2:
                during()
            yield f"d1/m{i}".encode(), Mark(i % 4, i, seen_at_ms=1000 * i).encode()
    return items


def gauge() -> float:
    return next(iter(metrics.DEDUP_MARKS.collect())).samples[0].value


def test_restored_marks_are_indexed_while_the_loop_keeps_turning_and_the_gauge_counts_them():
    pipeline, *_ = rig()
    pipeline._indexed = False
    pipeline.marks.table.items = restored_marks()
    turns = 0

    async def scenario() -> None:
        nonlocal turns
        pass_done = asyncio.ensure_future(pipeline._index_restored_marks())
        while not pass_done.done():
            turns += 1
            await asyncio.sleep(0)
        await pass_done

    asyncio.run(scenario())
    assert pipeline._indexed and len(pipeline._expiry) == RESTORED == gauge()
    assert turns >= 3  # the loop ran other tasks between the chunks
    assert pipeline._expiry.expired(1, now_ms=1000 * 9 + 3_600_000, limit=10) == [b"d1/m1", b"d1/m5", b"d1/m9"]


def test_an_assignment_during_the_pass_leaves_the_index_to_be_rebuilt():
    pipeline, *_ = rig()
    pipeline._indexed = False
    pipeline.marks.table.items = restored_marks(during=lambda: pipeline.on_partitions_assigned({0, 1}))
    asyncio.run(pipeline._index_restored_marks())
    assert not pipeline._indexed  # the next message indexes again, with the new assignment's marks


def test_a_store_changing_under_the_pass_leaves_the_index_to_be_rebuilt():
    pipeline, *_ = rig()
    pipeline._indexed = False

    def during() -> None:
        raise RuntimeError("dictionary changed size during iteration")

    pipeline.marks.table.items = restored_marks(during=during)
    asyncio.run(pipeline._index_restored_marks())
    assert not pipeline._indexed


def test_marks_decided_but_not_yet_in_the_store_are_indexed_too():
    # A pass that an assignment overtook is thrown away, but the message that started it is still
    # decided: its mark waits in the batch, not in the store, when the next pass reads the store.
    pipeline, *_ = rig(batch_size=100)
    pipeline._indexed = False
    pipeline.marks.table.items = restored_marks(10, during=lambda: pipeline.on_partitions_assigned({0}))
    message = rig()[-1]
    asyncio.run(pipeline.handle(message(100)))  # its pass is discarded; the message is decided
    assert not pipeline._indexed and pipeline.marks.pending == 1
    pipeline.marks.table.items = restored_marks(10)
    asyncio.run(pipeline.handle(message(101)))
    assert pipeline._indexed
    indexed = set(pipeline._expiry.keys())
    assert {b"d1/m100", b"d1/m101"} <= indexed  # m100 was in the batch only, never in the store


def test_a_message_a_rebalance_overtakes_during_the_pass_is_left_undecided():
    # The pass lets the loop run; a rebalance that starts meanwhile (Faust suspends the flow, the
    # revocation flushes) may give the message's partition to another worker. Deciding it after
    # that would write its mark and its device's account into a changelog partition now owned
    # elsewhere: it is left to the partition's next owner instead.
    pipeline, sink, (marks, accounts, latest), _log, acked, message = rig(batch_size=100)
    pipeline._indexed = False
    assignment = {"current": True}
    pipeline.marks.table.items = restored_marks(10, during=lambda: assignment.update(current=False))

    async def scenario() -> bool:
        async with pipeline.deciding(lambda m: assignment["current"]) as handle:
            return await handle(message(100))

    assert asyncio.run(scenario()) is False
    assert (marks.pending, accounts.pending, latest.pending) == (0, 0, 0)
    assert pipeline._pending == [] and sink.writes == [] and acked == []
    # Still current: the same message is decided (and the pass that ran for it is kept).
    pipeline.marks.table.items = restored_marks(10)
    assert asyncio.run(pipeline.handle(message(100))) is True
    assert (accounts.pending, len(pipeline._pending)) == (1, 1) and marks.pending >= 1 and pipeline._indexed


def timed_rig():
    """A pipeline whose rows are stored at once, on a clock the test moves, with a 60 s window."""
    pipeline, sink, (marks, *_), _log, _acked, message = rig(batch_size=100)

    async def stored_at_once(rows):
        return len(rows)
    sink.write = stored_at_once
    now = [1_796_040_000.0]
    pipeline.clock = lambda: now[0]
    pipeline.window_ms = pipeline._expiry.window_ms = 60_000
    return pipeline, marks, message, now


def test_the_timer_expires_the_marks_of_a_partition_no_message_comes_to_and_not_of_one_revoked():
    # Each message expires marks of its own partition only: a partition whose devices went quiet
    # (or whose backlog was read before the others') kept its marks — a 10M-message run held twice
    # a window's marks at its end. The tick expires every active partition's due marks.
    pipeline, marks, message, now = timed_rig()

    async def scenario() -> None:
        for offset in range(3):
            await pipeline.handle(message(offset))  # partition 0
        quiet = SimpleNamespace(**{**vars(message(3)), "partition": 1})
        await pipeline.handle(quiet)
        await pipeline.flush()
        assert len(marks.stored) == 4 and len(pipeline._expiry) == 4
        now[0] += 59
        await pipeline.tick()
        assert len(marks.stored) == 4  # not due yet
        now[0] += 2
        pipeline.forget_partitions({1})  # revoked: its marks are the next owner's to expire
        await pipeline.tick()
        assert sorted(marks.stored) == [b"d1/m3"] and len(pipeline._expiry) == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_timer_expires_nothing_while_a_rebalance_has_suspended_the_flow():
    # Between the start of a rebalance and the revocation signal the index still holds the
    # partitions being revoked: a tombstone written then could reach a partition another worker
    # is already restoring.
    pipeline, marks, message, now = timed_rig()

    async def scenario() -> None:
        await pipeline.handle(message(0))
        await pipeline.flush()
        now[0] += 61
        await pipeline.tick(active=lambda: False)
        assert len(marks.stored) == 1 and len(pipeline._expiry) == 1
        await pipeline.tick(active=lambda: True)
        assert len(marks.stored) == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))
