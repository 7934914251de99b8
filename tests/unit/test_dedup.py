from __future__ import annotations

from hypothesis import given, settings, strategies as st

from iotflow.dedup import INVALID, REJECTED, DeviceAccount, ExpiryIndex, LatestValues, Mark, Verdict, dedup_key, verdict


def test_the_first_message_with_a_msg_id_is_new():
    assert verdict(None, partition=3, offset=10) is Verdict.NEW


def test_a_later_message_with_the_same_msg_id_is_a_duplicate():
    assert verdict(Mark(3, 10, 0), partition=3, offset=11) is Verdict.DUPLICATE


def test_the_marking_message_replayed_after_a_crash_is_recognised_as_itself():
    # Invariant 3: the mark outlived the rows; the replayed original must be written again.
    assert verdict(Mark(3, 10, 0), partition=3, offset=10) is Verdict.REPLAY


def test_marks_survive_their_table_form():
    mark = Mark(2, 99, 1_700_000_000_000)
    assert mark.encode() == b"[2,99,1700000000000]"
    assert Mark.decode(mark.encode()) == mark


def test_keys_join_device_and_msg_id():
    assert dedup_key("dev-1", "m-1") == b"dev-1/m-1"


def test_expiry_pops_only_expired_keys_of_one_partition_up_to_a_limit():
    index = ExpiryIndex(window_ms=1000)
    for i in range(5):
        index.add(f"k{i}".encode(), Mark(0, i, seen_at_ms=i * 100))
    index.add(b"other", Mark(1, 0, seen_at_ms=0))
    assert index.expired(0, now_ms=1250, limit=10) == [b"k0", b"k1", b"k2"]
    assert index.expired(0, now_ms=5000, limit=1) == [b"k3"]
    assert index.expired(1, now_ms=999, limit=10) == []
    assert len(index) == 2


def test_restored_marks_are_indexed_and_expire_like_new_ones():
    # faust #385: recovered keys never expired. Here restored marks go through the same index.
    restored = {b"a": Mark(0, 1, 0), b"b": Mark(0, 2, 5000)}
    index = ExpiryIndex(window_ms=1000)
    for key, mark in restored.items():
        index.add(key, mark)
    assert index.expired(0, now_ms=2000, limit=10) == [b"a"]


def test_partitions_given_away_are_dropped_from_the_index():
    index = ExpiryIndex(window_ms=10)
    index.add(b"a", Mark(0, 1, 0))
    index.add(b"b", Mark(1, 1, 0))
    index.drop_partitions_except({1})
    assert index.expired(0, 100, 10) == [] and index.expired(1, 100, 10) == [b"b"]


def test_an_account_counts_each_kind_of_message():
    account = DeviceAccount()
    account.count(Verdict.NEW, offset=0, now_ms=1, seq=5)
    account.count(Verdict.DUPLICATE, offset=1, now_ms=2)
    account.count(INVALID, offset=2, now_ms=3)
    account.count(Verdict.NEW, offset=3, now_ms=4, seq=8)
    account.count(REJECTED, offset=4, now_ms=5)
    assert (account.received, account.accepted, account.duplicates, account.invalid, account.rejected) == (5, 2, 1, 1, 1)
    assert (account.min_seq, account.max_seq, account.gaps) == (5, 8, 2)  # seqs 6 and 7 never came
    assert account.already_counted(4) and not account.already_counted(5)
    assert DeviceAccount.decode(account.encode()) == account
    assert DeviceAccount.decode(None) == DeviceAccount()


def test_an_account_written_before_rejections_were_counted_still_reads():
    old = b'{"received":3,"accepted":3,"duplicates":0,"invalid":0,"min_seq":0,"max_seq":2,"last_offset":2,"last_seen_ms":9}'
    assert DeviceAccount.decode(old) == DeviceAccount(3, 3, 0, 0, 0, 0, 2, 2, 9)


def test_a_replayed_message_that_was_never_counted_counts_as_accepted():
    # Its mark was written but the crash came before its account: this is its first count.
    account = DeviceAccount()
    account.count(Verdict.REPLAY, offset=7, now_ms=1, seq=3)
    assert (account.received, account.accepted, account.min_seq, account.max_seq) == (1, 1, 3, 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=300))
def test_gaps_are_the_sequence_numbers_that_never_arrived(seqs):
    account, marks = DeviceAccount(), {}
    for offset, seq in enumerate(seqs):
        outcome = verdict(marks.get(seq), 0, offset)
        if outcome is Verdict.NEW:
            marks[seq] = Mark(0, offset, 0)
        account.count(outcome, offset, 0, seq)
    distinct = set(seqs)
    assert account.accepted == len(distinct)
    assert account.duplicates == len(seqs) - len(distinct)
    assert account.gaps == len(set(range(min(seqs), max(seqs) + 1)) - distinct)


def test_latest_values_keep_the_newest_measurement_of_each_metric():
    latest = LatestValues()
    latest.update((("temp", 20.0), ("hum", 40.0)), time_ms=2000)
    latest.update((("temp", 10.0),), time_ms=1000)  # late or replayed: older than what is held
    latest.update((("temp", 21.5),), time_ms=3000)
    assert latest.values == {"temp": (21.5, 3000), "hum": (40.0, 2000)}
    assert LatestValues.decode(latest.encode()) == latest


def test_marks_made_here_pop_in_order_once_each_across_the_index_compacting_its_front():
    index = ExpiryIndex(window_ms=1000)
    made = [f"d{i % 7}/m{i}".encode() for i in range(20_000)]
    for i, key in enumerate(made):
        index.add(key, Mark(3, i, seen_at_ms=i))
    assert index.expired(3, now_ms=999, limit=10) == []
    popped: list[bytes] = []
    late: list[bytes] = []
    while got := index.expired(3, now_ms=10**9, limit=997):  # the consumed front is cut away several times
        popped += got
        if len(late) < 30:  # appended behind everything, before and after the cuts
            late.append(f"late{len(late)}".encode())
            index.add(late[-1], Mark(3, 0, seen_at_ms=19_999))
        assert len(index) == len(list(index.keys())) == len(made) + len(late) - len(popped)
    assert popped == made + late and len(index) == 0


def test_a_mark_made_after_the_clock_stepped_back_expires_late_never_early():
    index = ExpiryIndex(window_ms=100)
    index.add(b"a", Mark(0, 1, seen_at_ms=1000))
    index.add(b"b", Mark(0, 2, seen_at_ms=900))  # the clock went back 100 ms
    assert index.expired(0, now_ms=1099, limit=10) == []
    assert index.expired(0, now_ms=1100, limit=10) == [b"a", b"b"]


def test_restored_marks_and_marks_made_here_expire_together():
    index = ExpiryIndex(window_ms=100)
    index.add_restored(b"old2", Mark(0, 2, seen_at_ms=50))
    index.add_restored(b"old1", Mark(0, 1, seen_at_ms=10))
    index.add(b"new", Mark(0, 3, seen_at_ms=60))
    assert sorted(index.keys()) == [b"new", b"old1", b"old2"]
    assert index.expired(0, now_ms=155, limit=10) == [b"old1", b"old2"]
    assert index.expired(0, now_ms=160, limit=10) == [b"new"] and len(index) == 0


def test_the_index_of_marks_made_here_takes_a_few_dozen_bytes_a_mark():
    # The heap of (expiry, key) tuples it replaced took ~150 bytes a mark: a worker holding a
    # window's marks (millions) grew with them (docs/performance.md, memory over a long run).
    import tracemalloc
    keys = [f"device-{i % 50}/device-{i % 50}-{i}".encode() for i in range(100_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = ExpiryIndex(window_ms=60_000)
        for i, key in enumerate(keys):
            index.add(key, Mark(i % 8, i, seen_at_ms=i))
        per_mark = (tracemalloc.get_traced_memory()[0] - before) / len(keys)
    finally:
        tracemalloc.stop()
    assert per_mark < 2 * 8 + max(map(len, keys)) + 10, per_mark  # two int64s and the key's bytes
