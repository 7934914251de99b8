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


@dataclass
class ExpiryIndex:
    """Which marks expire when, per partition, so they can be deleted from inside that partition's stream."""

    window_ms: int
    _heaps: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)

    def add(self, key: bytes, mark: Mark) -> None:
        heapq.heappush(self._heaps.setdefault(mark.partition, []), (mark.seen_at_ms + self.window_ms, key))

    def expired(self, partition: int, now_ms: int, limit: int) -> list[bytes]:
        """Pop up to ``limit`` keys of ``partition`` whose window has passed."""
        heap = self._heaps.get(partition)
        keys: list[bytes] = []
        while heap and len(keys) < limit and heap[0][0] <= now_ms:
            keys.append(heapq.heappop(heap)[1])
        return keys

    def drop_partitions_except(self, keep: set[int]) -> None:
        for partition in list(self._heaps):
            if partition not in keep:
                del self._heaps[partition]

    def __len__(self) -> int:
        return sum(len(h) for h in self._heaps.values())


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
