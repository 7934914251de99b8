"""Object storage for the cold tier: a local folder (``file://``) or an S3 API bucket (``s3://``).

Both are pyarrow filesystems, so Parquet is read and written through the same calls either way.
Every write is all-or-nothing: a local file is written beside its name and renamed into place; an
S3 object appears only when its (multipart) upload completes. A crash mid-write therefore leaves
at most a temporary file, never a half object under the final name. The calls block; async code
runs them in a thread.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from iotflow.settings import Settings

_CHUNK = 1 << 20
_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


class ObjectStore:
    """Keys are ``/``-separated paths below the URL's folder or bucket prefix."""

    def __init__(self, url: str, fs: pafs.FileSystem, root: str) -> None:
        self.url = url
        self.fs = fs
        self.root = root.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None) -> ObjectStore:
        url = url or settings.archive_location
        if url is None:
            raise ValueError("the archive is switched off (IOTFLOW_ARCHIVE_URL=none)")
        parts = urlsplit(url)
        if parts.scheme == "file":
            Path(parts.path).mkdir(parents=True, exist_ok=True)
            return cls(url, pafs.LocalFileSystem(), parts.path)
        if parts.scheme == "s3":
            endpoint = urlsplit(settings.archive_s3_endpoint) if settings.archive_s3_endpoint else None
            options: dict = {
                "region": settings.archive_s3_region,
                "connect_timeout": _TIMEOUT_S,
                "request_timeout": _TIMEOUT_S,
            }
            if endpoint is not None:
                options["endpoint_override"] = endpoint.netloc
                options["scheme"] = endpoint.scheme
            if settings.archive_s3_access_key_id:
                options["access_key"] = settings.archive_s3_access_key_id
                options["secret_key"] = settings.archive_s3_secret_access_key
            return cls(url, pafs.S3FileSystem(**options), f"{parts.netloc}{parts.path}")
        raise ValueError(f"unsupported archive URL {url!r}: file:// or s3://")

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put_file(self, key: str, source: Path) -> None:
        """Upload a local file under ``key`` (replacing what was there) all at once."""
        target = self.path(key)
        if self.local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            staging = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copyfile(source, staging)
            with open(staging, "rb") as done:
                os.fsync(done.fileno())
            os.replace(staging, target)
            return
        with open(source, "rb") as src, self.fs.open_output_stream(target) as out:
            shutil.copyfileobj(src, out, _CHUNK)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        if self.local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            staging = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(staging, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, target)
            return
        with self.fs.open_output_stream(target) as out:
            out.write(data)

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        try:
            with self.fs.open_input_stream(self.path(key)) as src:
                return src.read()
        except FileNotFoundError:
            return None

    def open(self, key: str) -> BinaryIO:
        """A seekable reader (what Parquet needs)."""
        return self.fs.open_input_file(self.path(key))

    def sha256(self, key: str) -> tuple[str, int]:
        """(hex digest, size) of the object as the store gives it back."""
        digest = hashlib.sha256()
        size = 0
        with self.fs.open_input_stream(self.path(key)) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def list(self, prefix: str) -> list[StoredObject]:
        """Objects directly below the folder ``prefix`` (its sub-folders are listed as keys too,
        with size 0), sorted by key; nothing when the folder does not exist."""
        selector = pafs.FileSelector(self.path(prefix), allow_not_found=True, recursive=False)
        found = []
        for info in self.fs.get_file_info(selector):
            key = info.path[len(self.root) + 1:]
            found.append(StoredObject(key, info.size or 0))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self.path(key))
        except FileNotFoundError:
            pass

    def delete_folder(self, prefix: str) -> None:
        try:
            self.fs.delete_dir(self.path(prefix))
        except FileNotFoundError:
            pass
