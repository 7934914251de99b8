from __future__ import annotations

import asyncio

import asyncpg
import pytest

from iotflow.errors import CircuitOpen, SinkUnavailable
from iotflow.sinks.timescale import is_retriable


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
        asyncpg.exceptions.CannotConnectNowError("starting up"),
        asyncpg.exceptions.AdminShutdownError("shutting down"),
        asyncpg.exceptions.QueryCanceledError("statement timeout"),
        asyncpg.exceptions.SerializationError("retry"),
        asyncpg.exceptions.DeadlockDetectedError("retry"),
        asyncpg.exceptions.TooManyConnectionsError("full"),
        ConnectionRefusedError(),
        asyncio.TimeoutError(),
        SinkUnavailable("down"),
        CircuitOpen("db", 1.0),
    ],
)
def test_transient_failures_are_retried(exc):
    assert is_retriable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.UndefinedTableError("no table"),
        asyncpg.exceptions.NotNullViolationError("null"),
        asyncpg.exceptions.InvalidTextRepresentationError("bad"),
        ValueError("bug"),
    ],
)
def test_failures_of_the_rows_themselves_are_not_retried(exc):
    assert not is_retriable(exc)
