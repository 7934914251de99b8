"""Errors raised by iotflow, drawn as a tree::

    IotflowError
    ├── SettingsError          a bad IOTFLOW_* value; the process must not start
    └── StackError             the local stack could not be installed, started or stopped

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
