"""Backoff and rate limiting shared by the bridge and the simulator (plain logic, no I/O)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


def full_jitter(attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): uniform in [0, min(cap, base·2^attempt)].

    "Full jitter" spreads a fleet that lost its broker at the same instant over the whole window,
    so their reconnects do not arrive as one thundering herd (seed finding R-12).
    """
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 32)))
    return (rng or random).uniform(0.0, ceiling)


@dataclass
class TokenBuckets:
    """Per-key token buckets (GCRA) that *reserve* a send time instead of dropping.

    :meth:`reserve` returns how long the caller must wait before sending: 0 while the key is
    within ``rate_per_s`` with bursts of ``burst``, more when it is over. Reservations are made in
    arrival order, so one key's messages keep their order; excess is delayed, never dropped.
    """

    rate_per_s: float
    burst: int
    _tat: dict[str, float] = field(default_factory=dict)  # theoretical arrival time per key

    def reserve(self, key: str, now: float) -> float:
        interval = 1.0 / self.rate_per_s
        tolerance = (self.burst - 1) * interval
        tat = max(self._tat.get(key, now), now)
        self._tat[key] = tat + interval
        delay = tat - tolerance - now
        return delay if delay > 1e-6 else 0.0  # below a microsecond is float noise, not a limit

    def admit(self, key: str, now: float) -> float:
        """For callers that refuse instead of delaying: 0 when ``key`` is within its rate (a token is
        taken), else the seconds until it would be (nothing taken: a refused request costs nothing)."""
        interval = 1.0 / self.rate_per_s
        tat = max(self._tat.get(key, now), now)
        wait = tat - (self.burst - 1) * interval - now
        if wait > 1e-6:
            return wait
        self._tat[key] = tat + interval
        return 0.0

    def forget_idle(self, now: float) -> None:
        """Drop keys whose buckets are full again (bounded memory with many devices)."""
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]

    def __len__(self) -> int:
        return len(self._tat)
