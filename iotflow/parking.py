"""Telemetry of devices the registry does not know yet, held while their registration catches up.

A device may publish moments before its registration reaches the registry table (the seed's
registration race: the device is provisioned, powers up and sends, while the ``registered`` event
is still in the outbox). Its messages wait here — in arrival order, unacknowledged, so a crash or a
rebalance hands them to the next owner of the partition through Kafka — and the registry is asked
again with exponential backoff and full jitter. A device still unknown after ``wait_s`` has its
messages released as unknown (the caller sends them to the DLQ). At most ``max_messages`` wait:
when the lot is :attr:`full` the caller stops taking messages until some leave (backpressure, not
drops; the longest wait bounds the stall, and Kafka keeps the backlog meanwhile).

Plain logic, no I/O: the ingest pipeline decides what a released message becomes.
"""
from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from iotflow.backoff import full_jitter

T = TypeVar("T")

_FIRST_RETRY_S = 0.05
_LONGEST_RETRY_S = 5.0


@dataclass
class _Waiting(Generic[T]):
    partition: int
    since_ms: int
    next_check_ms: int
    checks: int = 0
    items: list[T] = field(default_factory=list)


class ParkingLot(Generic[T]):
    def __init__(self, *, wait_s: float, max_messages: int, rng: random.Random | None = None) -> None:
        self.wait_ms = int(wait_s * 1000)
        self.max_messages = max_messages
        self._rng = rng or random.Random()
        self._waiting: dict[bytes, _Waiting[T]] = {}
        # (next check, tiebreak, device): entries whose device left or was rescheduled are stale
        # and skipped, so finding the due devices costs nothing while nobody is due.
        self._schedule: list[tuple[int, int, bytes]] = []
        self._tiebreak = itertools.count()
        self._count = 0

    def __len__(self) -> int:
        """Messages waiting."""
        return self._count

    def holds(self, device: bytes) -> bool:
        return device in self._waiting

    def park(self, device: bytes, partition: int, item: T, now_ms: int) -> None:
        """Hold ``item`` behind the device's earlier messages (a device's messages keep their order)."""
        waiting = self._waiting.get(device)
        if waiting is None:
            waiting = self._waiting[device] = _Waiting(partition, now_ms, now_ms + self._delay_ms(0))
            self._plan(device, waiting.next_check_ms)
        waiting.items.append(item)
        self._count += 1

    def any_due(self, now_ms: int) -> bool:
        """Whether a device may be due now (the earliest planned check has come): cheap enough for
        every message, where :meth:`due` is not."""
        return bool(self._schedule) and self._schedule[0][0] <= now_ms

    def due(self, now_ms: int) -> list[bytes]:
        """Devices to ask the registry about again now (each must be retried later or released)."""
        devices = []
        while self._schedule and self._schedule[0][0] <= now_ms:
            check_ms, _, device = heapq.heappop(self._schedule)
            waiting = self._waiting.get(device)
            if waiting is not None and waiting.next_check_ms == check_ms and device not in devices:
                devices.append(device)
        return devices

    def expired(self, device: bytes, now_ms: int) -> bool:
        """Whether the device has waited as long as it may."""
        return now_ms - self._waiting[device].since_ms >= self.wait_ms

    def retry_later(self, device: bytes, now_ms: int) -> None:
        """The registry still does not know the device: ask again after a longer (jittered) pause."""
        waiting = self._waiting[device]
        waiting.checks += 1
        waiting.next_check_ms = min(now_ms + self._delay_ms(waiting.checks), waiting.since_ms + self.wait_ms)
        self._plan(device, waiting.next_check_ms)

    def release(self, device: bytes) -> list[T]:
        """The device's messages, in arrival order; it no longer waits."""
        waiting = self._waiting.pop(device)
        self._count -= len(waiting.items)
        return waiting.items

    @property
    def full(self) -> bool:
        return self._count >= self.max_messages

    def next_due_ms(self) -> int | None:
        """When the earliest waiting device is due to be asked again (None: nobody waits)."""
        while self._schedule:
            check_ms, _, device = self._schedule[0]
            waiting = self._waiting.get(device)
            if waiting is not None and waiting.next_check_ms == check_ms:
                return check_ms
            heapq.heappop(self._schedule)
        return None

    def _plan(self, device: bytes, check_ms: int) -> None:
        heapq.heappush(self._schedule, (check_ms, next(self._tiebreak), device))

    def partition_of(self, device: bytes) -> int:
        return self._waiting[device].partition

    def forget_partitions(self, partitions: set[int]) -> int:
        """Drop what waits in ``partitions`` (the caller no longer owns them and never acknowledged
        these messages, so the next owner reads them again); returns how many messages were dropped."""
        dropped = 0
        for device in [d for d, w in self._waiting.items() if w.partition in partitions]:
            dropped += len(self.release(device))
        return dropped

    def _delay_ms(self, checks: int) -> int:
        return int(full_jitter(checks, base_s=_FIRST_RETRY_S, cap_s=_LONGEST_RETRY_S, rng=self._rng) * 1000)
