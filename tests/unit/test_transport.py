from __future__ import annotations

from intervaltree import IntervalTree
from mode.utils.queues import FlowControlQueue

from iotflow.transport import REWINDS_PER_OFFSET, FlowControl, head_blocked, passed_undelivered, rewind_count


def test_a_single_unacknowledged_offset_right_after_the_committed_one_blocks_the_commit():
    # Faust's own check (`min(acked) - committed > 1`) lets this one through.
    assert head_blocked(acked_head=101, expected=100, gaps=IntervalTree())


def test_acknowledged_from_the_committed_offset_on_does_not_block():
    assert not head_blocked(acked_head=100, expected=100, gaps=IntervalTree())
    assert not head_blocked(acked_head=90, expected=100, gaps=IntervalTree())  # stale acks below


def test_recorded_gaps_may_cover_the_offsets_between():
    gaps = IntervalTree.from_tuples([(100, 103), (103, 105)])  # e.g. transaction markers
    assert not head_blocked(acked_head=105, expected=100, gaps=gaps)
    assert head_blocked(acked_head=106, expected=100, gaps=gaps)  # 105 is neither acked nor a gap
    assert head_blocked(acked_head=105, expected=99, gaps=gaps)  # 99 is neither


def test_with_nothing_to_compare_with_nothing_blocks():
    assert not head_blocked(acked_head=7, expected=None, gaps=IntervalTree())


def test_a_jump_is_read_again_a_bounded_number_of_times_per_offset():
    assert rewind_count(None, 10) == 1
    assert rewind_count((10, 1), 10) == 2
    assert rewind_count((10, REWINDS_PER_OFFSET), 10) == REWINDS_PER_OFFSET + 1  # then a gap
    assert rewind_count((10, REWINDS_PER_OFFSET), 57) == 1  # another offset starts again


def test_a_fetch_position_past_the_last_delivered_offset_is_a_passed_tail():
    assert passed_undelivered(read=27, position=30)  # 28 and 29 fetched, never delivered
    assert not passed_undelivered(read=27, position=28)  # everything fetched was delivered
    assert not passed_undelivered(read=None, position=30)  # nothing delivered to compare with
    assert not passed_undelivered(read=27, position=None)  # position being reset


def test_resuming_the_flow_keeps_what_the_streams_have_not_read_yet():
    flow = FlowControl()
    queue = FlowControlQueue(maxsize=10, flow_control=flow, clear_on_resume=True)  # as Faust's channels
    queue.put_nowait("offset 16")
    flow.resume()  # the table recovery's second resume: mode's would empty the queue
    assert flow.is_active() and queue.qsize() == 1
    flow.suspend()
    assert not flow.is_active()
    flow.clear()  # Faust's own clear when partitions are revoked still empties it
    assert queue.qsize() == 0
