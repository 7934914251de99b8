"""The firmware catalogue: which versions exist, where devices download them, and their checksum.

Adding a version is idempotent: the same version with the same URL, size and SHA-256 again
returns it as it is and writes nothing; the same version with other values is a
:class:`FirmwareConflict` (a published version never changes — publish a new one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from iotflow import audit
from iotflow.devices import FIRMWARE_VERSION, FieldErrors, check_text, json_object
from iotflow.errors import FirmwareConflict, FirmwareNotFound
from iotflow.registry import DeviceRegistry

_URL = re.compile(r"https?://[^\s\x00-\x1f\x7f]{1,2040}")
# A DNS name or an IPv4 address (urlsplit lower-cases it); an IPv6 literal comes without brackets.
_HOST = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*|[0-9a-f:.]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SIZE_BYTES = 1 << 40  # 1 TiB: anything larger is a mistake, not firmware
_FIELDS = ("version", "url", "size_bytes", "sha256")
PAGE = 100


@dataclass(frozen=True)
class Firmware:
    version: str
    url: str
    size_bytes: int
    sha256: str
    created_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "url": self.url, "size_bytes": self.size_bytes, "sha256": self.sha256,
                "created_at": self.created_at.isoformat() if self.created_at else None}

    def differs_from(self, other: Firmware) -> list[str]:
        return [name for name in _FIELDS[1:] if getattr(self, name) != getattr(other, name)]


def _url_parses(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:  # e.g. "Invalid IPv6 URL" for a stray bracket in the host
        return False
    return bool(parts.hostname) and _HOST.fullmatch(parts.hostname) is not None


def parse_firmware(body: bytes) -> Firmware:
    """A catalogue entry from a request body; every bad field is named with its value."""
    raw = json_object(body)
    errors = FieldErrors()
    for name in sorted(set(raw) - set(_FIELDS)):
        errors.add(name, raw[name], "unknown field")
    for name in _FIELDS:
        if name not in raw:
            errors.add(name, None, "required")
    version = check_text(errors, "version", raw["version"], FIRMWARE_VERSION,
                         "letters, digits and _.+- only, 1-64 characters") if "version" in raw else None
    if version == "rollouts":  # /api/v1/firmware/rollouts is the rollouts' collection
        errors.add("version", version, "a version other than the reserved word 'rollouts'")
    url = check_text(errors, "url", raw["url"], _URL, "an http(s) URL of at most 2048 characters") if "url" in raw else None
    if url is not None and not _url_parses(url):
        errors.add("url", url, "expected an http(s) URL with a valid host (a device must be able to fetch it)")
        url = None
    sha256 = check_text(errors, "sha256", raw["sha256"], _SHA256, "64 lowercase hex digits") if "sha256" in raw else None
    size = raw.get("size_bytes")
    if "size_bytes" in raw and (not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_SIZE_BYTES):
        errors.add("size_bytes", size, f"an integer from 1 to {MAX_SIZE_BYTES}")
    errors.raise_any("Invalid firmware")
    return Firmware(version, url, size, sha256)  # type: ignore[arg-type]


def _firmware(record: asyncpg.Record) -> Firmware:
    return Firmware(**dict(record))


class FirmwareCatalogue:
    """Firmware versions in PostgreSQL (the registry's database and pool)."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self.connection = registry.connection

    async def add(self, firmware: Firmware) -> tuple[Firmware, bool]:
        """The catalogue entry and whether this call created it."""
        async with self.connection(transaction=True) as conn:
            created = await conn.fetchrow(
                "INSERT INTO firmware (version, url, size_bytes, sha256) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (version) DO NOTHING RETURNING version, url, size_bytes, sha256, created_at",
                firmware.version, firmware.url, firmware.size_bytes, firmware.sha256)
            if created is not None:
                await audit.record(conn, "firmware.publish", "firmware", firmware.version, url=firmware.url,
                                   sha256=firmware.sha256, size_bytes=firmware.size_bytes)
                return _firmware(created), True
            existing = _firmware(await conn.fetchrow(
                "SELECT version, url, size_bytes, sha256, created_at FROM firmware WHERE version = $1",
                firmware.version))
        differs = existing.differs_from(firmware)
        if differs:
            raise FirmwareConflict(firmware.version, differs)
        return existing, False

    async def get(self, version: str) -> Firmware:
        async with self.connection() as conn:
            record = await conn.fetchrow(
                "SELECT version, url, size_bytes, sha256, created_at FROM firmware WHERE version = $1", version)
        if record is None:
            raise FirmwareNotFound(version)
        return _firmware(record)

    async def list(self, after: str | None) -> tuple[list[Firmware], str | None]:
        """A page of versions in version order after ``after``, and the cursor of the next page."""
        async with self.connection() as conn:
            records = await conn.fetch(
                "SELECT version, url, size_bytes, sha256, created_at FROM firmware "
                "WHERE $1::text IS NULL OR version > $1 ORDER BY version LIMIT $2", after, PAGE + 1)
        page = [_firmware(r) for r in records[:PAGE]]
        return page, (page[-1].version if len(records) > PAGE else None)
