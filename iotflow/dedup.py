"""Deduplication and per-device accounting decisions (plain logic, no I/O).

A *mark* remembers that a message (device_id, msg_id) was seen, and where: the Kafka partition and
offset of the message that made it. That is what keeps invariant 3 without ordering the dedup
table's changelog behind the sink: when a worker crashes after marking but before the rows are
durable, its offset was not committed, so the same message comes back at the same offset, finds
its own mark, and is written again. A different message with the same msg_id finds a mark with
another offset: a duplicate.

Marks expire after the dedup window. Faust's windowed tables only schedule expiry for keys
written by the running process, so keys restored from the changelog after a restart would never
expire (faust issue #385); :class:`ExpiryIndex` is filled from restored marks as well.
"""
from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import NamedTuple

import msgspec

_encode = msgspec.json.encode
_decode_mark = msgspec.json.Decoder(tuple[int, int, int]).decode
_decode_object = msgspec.json.Decoder(dict).decode


class Verdict(Enum):
    NEW = "new"  # first time seen: store it and mark it
    DUPLICATE = "duplicate"  # another message already carried this msg_id: count, don't store
    REPLAY = "replay"  # this very message again (a restart replayed it): store again; counted only if never counted


class Mark(NamedTuple):
    """Immutable; a named tuple rather than a frozen dataclass: one is made per message, and a frozen
    dataclass's ``__init__`` costs several times as much."""

    partition: int
    offset: int
    seen_at_ms: int

    def encode(self) -> bytes:
        """The table value: ``[partition, offset, seen_at_ms]`` as JSON."""
        return _encode(self)

    @classmethod
    def decode(cls, value: bytes) -> Mark:
        return cls(*_decode_mark(value))


def dedup_key(device_id: str, msg_id: str) -> bytes:
    """The dedup table's key; neither id may contain the separator (validation allows [A-Za-z0-9_.:-])."""
    return f"{device_id}/{msg_id}".encode()


def verdict(mark: Mark | None, partition: int, offset: int) -> Verdict:
    if mark is None:
        return Verdict.NEW
    if mark.partition == partition and mark.offset == offset:
        return Verdict.REPLAY
    return Verdict.DUPLICATE


class _Run:
    """One partition's marks made by this worker, in the order they expire, packed: the expiry times
    in one array, the keys end to end in one bytearray with their ends in another array — about
    16 bytes a mark besides its key, where a heap entry of a tuple and an int took ~100."""

    __slots__ = ("times", "ends", "blob", "head", "base")

    _COMPACT_AT = 4096  # popped entries before the consumed front is cut away (when it is half)

    def __init__(self) -> None:
        self.times = array("q")
        self.ends = array("q")  # each key's end, counted from the first key ever appended
        self.blob = bytearray()
        self.head = 0  # entries before it were popped
        self.base = 0  # bytes cut from the blob's front so far

    def append(self, expires_ms: int, key: bytes) -> None:
        times = self.times
        if times and expires_ms < times[-1]:
            expires_ms = times[-1]  # the clock stepped back: it expires a little late, never early
        times.append(expires_ms)
        self.blob += key
        self.ends.append(self.base + len(self.blob))

    def _start(self) -> int:
        """Where the first unpopped key begins, counted like ``ends``."""
        return self.ends[self.head - 1] if self.head else self.base

    def pop_due(self, now_ms: int, limit: int, out: list[bytes]) -> None:
        times, ends, blob, base = self.times, self.ends, self.blob, self.base
        head, count = self.head, len(times)
        start = self._start()
        while head < count and limit > 0 and times[head] <= now_ms:
            end = ends[head]
            out.append(bytes(blob[start - base:end - base]))
            start, head, limit = end, head + 1, limit - 1
        self.head = head
        if head >= self._COMPACT_AT and 2 * head >= count:
            cut = ends[head - 1]
            self.blob, self.base = blob[cut - base:], cut
            self.times, self.ends, self.head = times[head:], ends[head:], 0

    def keys(self) -> Iterator[bytes]:
        start = self._start()
        for end in self.ends[self.head:]:
            yield bytes(self.blob[start - self.base:end - self.base])
            start = end

    def __len__(self) -> int:
        return len(self.times) - self.head


class ExpiryIndex:
    """Which marks expire when, per partition: deleted as their partition's messages are decided,
    and on the flush timer for a partition no message comes to.

    Marks this worker makes (:meth:`add`) come in the order they expire — each at its decision's
    clock — and are kept packed (:class:`_Run`): the index of a long run's marks is a few dozen
    bytes a mark. Marks indexed from the store after an assignment (:meth:`add_restored`) come in
    key order and go to a heap per partition instead, which drains as they expire."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._runs: dict[int, _Run] = {}
        self._heaps: dict[int, list[tuple[int, bytes]]] = {}

    def add(self, key: bytes, mark: Mark) -> None:
        """A mark just made (its ``seen_at_ms`` is the newest, give or take a clock step)."""
        run = self._runs.get(mark.partition)
        if run is None:
            run = self._runs[mark.partition] = _Run()
        run.append(mark.seen_at_ms + self.window_ms, key)

    def add_restored(self, key: bytes, mark: Mark) -> None:
        """A mark read back from the store or a pending batch, in no particular order."""
        heapq.heappush(self._heaps.setdefault(mark.partition, []), (mark.seen_at_ms + self.window_ms, key))

    def expired(self, partition: int, now_ms: int, limit: int) -> list[bytes]:
        """Pop up to ``limit`` keys of ``partition`` whose window has passed."""
        keys: list[bytes] = []
        heap = self._heaps.get(partition)
        while heap and len(keys) < limit and heap[0][0] <= now_ms:
            keys.append(heapq.heappop(heap)[1])
        run = self._runs.get(partition)
        if run is not None and len(keys) < limit:
            run.pop_due(now_ms, limit - len(keys), keys)
        return keys

    def drop_partitions_except(self, keep: set[int]) -> None:
        self.drop_partitions(set(self.partitions()) - keep)

    def drop_partitions(self, gone: set[int]) -> None:
        for held in (self._runs, self._heaps):
            for partition in gone:
                held.pop(partition, None)

    def partitions(self) -> list[int]:
        """The partitions with marks indexed."""
        return sorted(set(self._runs) | set(self._heaps))

    def keys(self) -> Iterator[bytes]:
        """Every key indexed (restored ones first), for inspection."""
        for heap in self._heaps.values():
            for _, key in heap:
                yield key
        for run in self._runs.values():
            yield from run.keys()

    def __len__(self) -> int:
        return sum(len(h) for h in self._heaps.values()) + sum(len(r) for r in self._runs.values())


INVALID = "invalid"  # an account outcome: the payload failed validation
REJECTED = "rejected"  # an account outcome: valid, but the registry rejects its device


@dataclass(slots=True)
class DeviceAccount:
    """What one device's messages have done so far. ``last_offset`` makes updates replay-safe.

    Mutable: the ingest pipeline updates a device's account in place for every message of a batch
    and encodes it once when the batch is flushed.
    """

    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    invalid: int = 0
    rejected: int = 0  # valid, but of a deleted device or one the registry never came to know
    min_seq: int | None = None
    max_seq: int | None = None
    last_offset: int = -1
    last_seen_ms: int = 0

    @property
    def gaps(self) -> int:
        """Sequence numbers between the lowest and highest seen that never arrived."""
        if self.min_seq is None or self.max_seq is None:
            return 0
        return max(0, self.max_seq - self.min_seq + 1 - self.accepted)

    def already_counted(self, offset: int) -> bool:
        """A message at or below the last counted offset was counted before a restart replayed it."""
        return offset <= self.last_offset

    def count(self, outcome: Verdict | str, offset: int, now_ms: int, seq: int | None = None) -> None:
        """Count one more message: a dedup :class:`Verdict`, or ``INVALID`` / ``REJECTED``.

        Only messages not :meth:`already_counted` are counted, so a REPLAY here is a message whose
        mark was made but whose first pass was never counted (a crash between the two writes):
        it is the accepted instance.
        """
        self.received += 1
        self.last_offset = offset
        self.last_seen_ms = now_ms
        if outcome == INVALID:
            self.invalid += 1
        elif outcome == REJECTED:
            self.rejected += 1
        elif outcome is Verdict.DUPLICATE:
            self.duplicates += 1
        else:
            assert seq is not None and isinstance(outcome, Verdict), outcome
            self.accepted += 1
            self.min_seq = seq if self.min_seq is None or seq < self.min_seq else self.min_seq
            self.max_seq = seq if self.max_seq is None or seq > self.max_seq else self.max_seq

    def encode(self) -> bytes:
        """The table value: the fields as a JSON object."""
        return _encode({name: getattr(self, name) for name in _ACCOUNT_FIELDS})

    @classmethod
    def decode(cls, value: bytes | None) -> DeviceAccount:
        return cls(**_decode_object(value)) if value else cls()


_ACCOUNT_FIELDS = tuple(f.name for f in fields(DeviceAccount))


@dataclass(slots=True)
class LatestValues:
    """The last value of each metric of one device, by the measurement's own time: a replayed or
    late message never overwrites a newer value. Mutable, like :class:`DeviceAccount`."""

    values: dict[str, tuple[float, int]] = field(default_factory=dict)  # metric → (value, time in ms)

    def update(self, metrics: tuple[tuple[str, float], ...], time_ms: int) -> None:
        for name, value in metrics:
            held = self.values.get(name)
            if held is None or held[1] <= time_ms:
                self.values[name] = (value, time_ms)

    def encode(self) -> bytes:
        return _encode(self.values)

    @classmethod
    def decode(cls, value: bytes) -> LatestValues:
        return cls({name: (float(v), int(t)) for name, (v, t) in _decode_object(value).items()})
