"""Errors raised by iotflow, drawn as a tree::

    IotflowError
    ├── SettingsError          a bad IOTFLOW_* value; the process must not start
    ├── StackError             the local stack could not be installed, started or stopped
    ├── MigrationError         a schema migration is malformed or failed (nothing half-applied)
    ├── InvalidPayload         a message fails validation; it goes to the DLQ, the stream goes on
    ├── SinkUnavailable        retriable: the database is down, slow or failing over
    │   └── CircuitOpen        retriable: the breaker refuses calls for retry_after seconds
    └── SinkRejected           not retriable: the database refused these rows

Retry policy is read off the class (``retriable``), never off the message.
"""
from __future__ import annotations


class IotflowError(Exception):
    """Base of every error iotflow raises on purpose."""

    retriable = False


class SettingsError(IotflowError, ValueError):
    """A configuration value is wrong: names the variable, the value and what was expected."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"expected {expected} for {name} (got {value!r})")


class StackError(IotflowError):
    """A service of the local stack failed to install, start, become healthy or stop."""


class MigrationError(IotflowError):
    """A migration file is missing a step, misnamed, or failed in the database."""


class SinkUnavailable(IotflowError):
    """The sink's database cannot take writes right now; the same write may succeed later."""

    retriable = True


class CircuitOpen(SinkUnavailable):
    """The circuit breaker of a dependency is open; try again after ``retry_after`` seconds."""

    def __init__(self, name: str, retry_after: float) -> None:
        self.name = name
        self.retry_after = max(0.0, retry_after)
        super().__init__(f"circuit {name!r} is open; retry in {self.retry_after:.1f}s")


class SinkRejected(IotflowError):
    """The database refused the rows themselves (not retriable as they are)."""


NOT_SHOWN = object()


class InvalidPayload(IotflowError):
    """A message that cannot be processed: names the field, the value (when known) and the reason."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        if value is NOT_SHOWN:
            super().__init__(f"{field}: {reason}")
        else:
            shown = value if not isinstance(value, str | bytes) or len(value) <= 80 else value[:80]
            super().__init__(f"{field}: {reason} (got {shown!r})")
