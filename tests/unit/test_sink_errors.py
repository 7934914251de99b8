from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from iotflow.breaker import State
from iotflow.errors import CircuitOpen, SchemaBehind, SinkRejected, SinkUnavailable
from iotflow.sinks.timescale import MeasurementSink, is_retriable


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


class _Refusing:
    """A pool whose one connection copies the rows and then fails the move with ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def get(self) -> "_Refusing":
        return self

    def acquire(self, pool: object) -> contextlib.AbstractAsyncContextManager:
        return self._connection()

    @contextlib.asynccontextmanager
    async def _connection(self):
        yield self

    def transaction(self) -> contextlib.AbstractAsyncContextManager:
        return self._connection()

    async def copy_records_to_table(self, *args: object, **kwargs: object) -> None:
        return None

    async def fetchval(self, *args: object) -> int:
        raise self.exc


@pytest.mark.parametrize("exc", [asyncpg.exceptions.UndefinedTableError('relation "device_stored_messages" does not exist'),
                                 asyncpg.exceptions.UndefinedColumnError('column "x" does not exist'),
                                 asyncpg.exceptions.UndefinedFunctionError("function f() does not exist")])
def test_a_schema_older_than_the_statements_holds_the_rows_back_instead_of_rejecting_them(exc):
    sink = MeasurementSink("postgresql://unused/x", pool_size=1, connect_timeout_s=1, command_timeout_s=1)
    sink.pool = _Refusing(exc)
    with pytest.raises(SchemaBehind, match="iotflow migrate up") as raised:
        asyncio.run(sink._write_once([]))
    assert is_retriable(raised.value) and raised.value.__cause__ is exc
    assert sink.breaker.state is State.CLOSED  # the database answers: not the breaker's business


def test_rows_the_database_refuses_are_rejected():
    sink = MeasurementSink("postgresql://unused/x", pool_size=1, connect_timeout_s=1, command_timeout_s=1)
    sink.pool = _Refusing(asyncpg.exceptions.NotNullViolationError("null value in column"))
    with pytest.raises(SinkRejected):
        asyncio.run(sink._write_once([]))
