"""The ingest pipeline's acknowledgement of a written batch at once (iotflow.transport.Consumer.ack_all)
leaves Faust's commit bookkeeping exactly as Faust's own ``Message.ack`` of each message does."""
from __future__ import annotations

import asyncio

import faust
import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from iotflow.testing import consumer_of

TOPIC = "sensor-data"


@pytest.fixture
def consumer():
    """A factory of consumers through iotflow's transport, each of a Faust app of its own."""
    loops = []

    def make():
        loops.append(asyncio.new_event_loop())
        made = _consumer(faust.App("bulk-ack-test", loop=loops[-1]))
        loops.append(made[0]._thread.thread_loop)  # the consumer thread's, never started here
        return made
    yield make
    for loop in loops:
        loop.close()


def _consumer(app):
    made = consumer_of(app)
    made.app.topics.acks_enabled_for = lambda topic: topic == TOPIC
    tp = TP(TOPIC, 3)
    made._committed_offset[tp] = 5
    return made, tp


def messages(tp, offsets, topic=TOPIC):
    return [ConsumerMessage(topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, tp=TP(topic, tp.partition))
            for offset in offsets]


def state(made, tp):
    return (sorted(made._acked[tp]), sorted(made._acked_index[tp]), made._n_acked)


def test_ack_all_keeps_faust_s_own_bookkeeping(consumer):
    offsets = [3, 5, 6, 6, 8, 9]  # below the committed offset, a repeat, a hole at 7
    faust_way, tp = consumer()
    one_by_one = messages(tp, offsets)
    for message in one_by_one:
        message.ack(faust_way)
    ours, _ = consumer()
    at_once = messages(tp, offsets)
    ours.ack_all(at_once)
    assert state(ours, tp) == state(faust_way, tp) == ([5, 6, 8, 9], [5, 6, 8, 9], 4)
    assert all(m.acked for m in at_once) and all(m.acked for m in one_by_one)
    assert ours._new_offset(tp) == faust_way._new_offset(tp) == 7  # commits stop at the hole


def test_a_message_streams_still_hold_is_acknowledged_when_the_last_lets_go(consumer):
    ours, tp = consumer()
    held = messages(tp, [5])[0]
    held.incref()
    held.incref()
    ours.ack_all([held])
    assert not held.acked and state(ours, tp) == ([], [], 0)
    ours.ack_all([held])
    assert held.acked and state(ours, tp) == ([5], [5], 1)


def test_messages_of_topics_without_acks_are_only_marked(consumer):
    ours, tp = consumer()
    other = messages(tp, [7], topic="device-events")
    ours.ack_all(other)
    assert other[0].acked and ours._n_acked == 0
