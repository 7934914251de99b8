"""iotflow's own logs: one JSON object per line on stderr, with the bound context vars.

They bypass the standard library on purpose: structlog's stdlib factory installs a logger class
whose caller lookup walks the stack for every record, faust's and aiokafka's included.
Faust's own logs keep faust's format and its ``-l`` level."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable

import structlog


def configure(level: str) -> None:
    """Configure structlog to emit one JSON object per line with the bound context vars."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class Throttle:
    """At most one report per key per ``every_s``; says how many were held back since the last one.

    For events that repeat once per message while something is down (a broker outage makes every
    send fail): the first is reported at once, the rest are counted into the next report.
    """

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        """None: hold this one back. Otherwise report it, with the returned count of those held back."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class RepeatFilter(logging.Filter):
    """A :class:`logging.Filter` that lets each message template of a logger through once per
    ``every_s`` and notes how many repeats it held back. aiokafka logs every failed reconnect and
    metadata refresh (thousands of lines in a 10-second broker outage here: docs/operations.md)."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.throttle = Throttle(every_s, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        held = self.throttle.allow((record.name, record.msg))
        if held is None:
            return False
        if held:
            record.msg = f"{record.msg} [{held} similar messages held back]"
        return True


def quiet_repeats(package: str, every_s: float = 10.0) -> None:
    """A :class:`RepeatFilter` on the logger of ``package`` and on each of its modules' loggers
    created so far (a logger's filters do not apply to its children's records)."""
    names = [package, *(n for n in logging.Logger.manager.loggerDict if n.startswith(package + "."))]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter(every_s))
