"""iotflow's own logs: one JSON object per line on stderr, with the bound context vars.

They bypass the standard library on purpose: structlog's stdlib factory installs a logger class
whose caller lookup walks the stack for every record, faust's and aiokafka's included.
Faust's own logs keep faust's format and its ``-l`` level."""
from __future__ import annotations

import logging
import sys

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
