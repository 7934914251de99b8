"""The fetcher's hand-off of sensor-data records to the pipeline (iotflow.agents.ingest.decide_fetched):
records of a fetch are tracked and decided in order; a rebalance since the fetch ends the hand-off."""
from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

from faust.types import TP

from iotflow.agents.ingest import decide_fetched


class Rig:
    def __init__(self) -> None:
        self.tracked: list[int] = []
        self.decided: list[int] = []
        self.active = True
        self.app = SimpleNamespace(consumer_generation_id=7,
                                   consumer=SimpleNamespace(track_handed_over=lambda m: self.tracked.append(m.offset)),
                                   flow_control=SimpleNamespace(is_active=lambda: self.active),
                                   monitor=SimpleNamespace(stream_inbound_time={}))
        self.pipeline = SimpleNamespace(deciding=self.deciding)
        self.on_decide = None
        self.fetches = 0

    @contextlib.asynccontextmanager
    async def deciding(self, current):
        self.fetches += 1
        self.current = current
        yield self.handle

    async def handle(self, message) -> bool:
        if self.on_decide:
            self.on_decide(message)
        if not self.current(message):
            return False  # what the pipeline does when a rebalance overtook the message while it waited
        self.decided.append(message.offset)
        return True


def fetched(*offsets: int, generation: int = 7, partition: int = 0):
    return [SimpleNamespace(offset=offset, generation_id=generation, tp=TP("sensor-data", partition))
            for offset in offsets]


def test_every_record_of_a_fetch_is_tracked_then_decided_in_order():
    rig = Rig()
    assert asyncio.run(decide_fetched(rig.app, rig.pipeline, fetched(3, 4, 5))) == 3
    assert rig.tracked == rig.decided == [3, 4, 5]
    assert rig.fetches == 1  # one handler (one hold of the pipeline's order lock) per fetch


def test_decided_records_tell_faust_s_monitor_their_partition_is_being_processed():
    # Faust's check of slow streams reads it: without it, a worker catching up on a backlog older
    # than stream_processing_timeout logged "Stream has not started processing" for every partition.
    rig = Rig()
    asyncio.run(decide_fetched(rig.app, rig.pipeline, fetched(3, partition=2) + fetched(9, partition=5)))
    assert set(rig.app.monitor.stream_inbound_time) == {TP("sensor-data", 2), TP("sensor-data", 5)}


def test_records_fetched_before_a_rebalance_are_left_to_the_new_assignment():
    rig = Rig()
    assert asyncio.run(decide_fetched(rig.app, rig.pipeline, fetched(3, 4, generation=6))) == 0
    assert rig.tracked == rig.decided == []


def test_a_rebalance_that_starts_during_the_hand_off_ends_it_there():
    rig = Rig()

    def revoke_after_4(message) -> None:
        if message.offset == 5:
            rig.active = False  # Faust suspends the flow when partitions are revoked
    rig.on_decide = revoke_after_4
    assert asyncio.run(decide_fetched(rig.app, rig.pipeline, fetched(3, 4, 5, 6))) == 2
    assert rig.decided == [3, 4]  # 5: overtaken while it was being decided; 6: not even tracked
    assert rig.tracked == [3, 4, 5]


def test_a_new_generation_during_the_hand_off_ends_it_too():
    rig = Rig()

    def reassigned(message) -> None:
        if message.offset == 4:
            rig.app.consumer_generation_id = 8
    rig.on_decide = reassigned
    assert asyncio.run(decide_fetched(rig.app, rig.pipeline, fetched(3, 4))) == 1
    assert rig.decided == [3]
