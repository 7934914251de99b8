"""Errors raised by iotflow, drawn as a tree::

    IotflowError
    ├── SettingsError          a bad IOTFLOW_* value; the process must not start
    ├── StackError             the local stack could not be installed, started or stopped
    ├── MigrationError         a schema migration is malformed or failed (nothing half-applied)
    ├── InvalidPayload         a message fails validation; it goes to the DLQ, the stream goes on
    ├── InvalidRequest         an API request fails validation (422): every bad field, named
    ├── Unauthorized           no valid bearer token (401)
    ├── Forbidden              a valid token whose role does not allow the request (403)
    ├── SinkUnavailable        retriable: the database is down, slow or failing over
    │   ├── CircuitOpen        retriable: the breaker refuses calls for retry_after seconds
    │   └── SchemaBehind       retriable: the database lacks a migration this release writes through
    ├── SinkRejected           not retriable: the database refused these rows
    ├── RegistryUnavailable    retriable: the device registry's database cannot answer now (503)
    ├── DeviceNotFound         no device with this id, or it was deleted (404)
    ├── DeviceConflict         the id is registered already, with other attributes (409)
    └── VersionMismatch        a change named an older version of the device than the current (412)

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


class SchemaBehind(SinkUnavailable):
    """The sink's statements name a table, column or function the database does not have: a
    migration of this release is not applied (``iotflow migrate up``). Not the rows' fault, so they
    wait (the agent blocks, Kafka keeps them) instead of going to the DLQ."""


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


class InvalidRequest(IotflowError):
    """An API request that fails validation: ``errors`` lists each field, its value and the reason."""

    def __init__(self, title: str, errors: list[dict[str, object]]) -> None:
        self.title = title
        self.errors = errors
        super().__init__(f"{title}: " + "; ".join(f"{e['field']}: {e['reason']}" for e in errors))


class Unauthorized(IotflowError):
    """The request carries no valid bearer token; ``reason`` says what is wrong with it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Forbidden(IotflowError):
    """A valid token whose role does not include the role the request needs."""

    def __init__(self, subject: str, role: str, needed: str) -> None:
        self.subject = subject
        self.role = role
        self.needed = needed
        super().__init__(f"{subject!r} has role {role!r}; this request needs {needed!r} or above")


class RegistryUnavailable(IotflowError):
    """The device registry's database is down, slow or failing over; the same call may succeed later."""

    retriable = True


class MqttAuthError(IotflowError):
    """The MQTT broker's credential manager (dynamic security) refused or did not answer."""

    retriable = True


class DeviceNotFound(IotflowError):
    """No device with this id, or only a deleted one."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        super().__init__(f"no device {device_id!r}")


class DeviceConflict(IotflowError):
    """A registration names an id that exists with other attributes (registering again is not a change)."""

    def __init__(self, device_id: str, fields: list[str]) -> None:
        self.device_id = device_id
        self.fields = fields
        super().__init__(f"device {device_id!r} is registered with other values of {', '.join(fields)}; "
                         "use PATCH to change it")


class VersionMismatch(IotflowError):
    """A change named (If-Match) a version of the device other than its current one."""

    def __init__(self, device_id: str, expected: int, current: int) -> None:
        self.device_id = device_id
        self.expected = expected
        self.current = current
        super().__init__(f"device {device_id!r} is at version {current}, not {expected}; read it again and retry")


class FirmwareNotFound(IotflowError):
    """No such firmware version in the catalogue."""

    def __init__(self, version: str) -> None:
        self.version = version
        super().__init__(f"no firmware version {version!r}")


class FirmwareConflict(IotflowError):
    """A firmware version exists with another URL, size or checksum (a published version never changes)."""

    def __init__(self, version: str, fields: list[str]) -> None:
        self.version = version
        self.fields = fields
        super().__init__(f"firmware {version!r} is published with other values of {', '.join(fields)}; "
                         "publish a new version instead")


class IdempotencyMismatch(IotflowError):
    """An Idempotency-Key already used for a request with another body."""

    def __init__(self, key: str, rollout_id: str) -> None:
        self.key = key
        self.rollout_id = rollout_id
        super().__init__(f"Idempotency-Key {key!r} was used for another request (rollout {rollout_id}); "
                         "a retry must repeat the original body, a new request needs a new key")


class RolloutNotFound(IotflowError):
    def __init__(self, rollout_id: str) -> None:
        self.rollout_id = rollout_id
        super().__init__(f"no rollout {rollout_id!r}")


class RolloutConflict(IotflowError):
    """An action the rollout's status does not allow (resume a completed rollout, roll back one
    that never ran, …)."""

    def __init__(self, rollout_id: str, status: str, action: str) -> None:
        self.rollout_id = rollout_id
        self.status = status
        super().__init__(f"rollout {rollout_id} is {status}: it cannot {action}")


class FlagNotFound(IotflowError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no flag {name!r}")
