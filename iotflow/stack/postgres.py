"""A PostgreSQL cluster owned by the stack (Debian's server binaries), on loopback.

PostgreSQL refuses to run as root, so when we are root every server command runs as the
``postgres`` user and the cluster's folder belongs to it. The roles and databases named in
``IOTFLOW_PG_DSN`` and ``IOTFLOW_TSDB_DSN`` are created on start if missing.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.stack.base import Service, ServiceStatus, StackPaths, loopback_port, refuse_taken_ports, run

_ADMIN = "postgres"


def find_bindir() -> Path:
    """Debian keeps server binaries in /usr/lib/postgresql/<major>/bin; take the newest."""
    candidates = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise StackError("PostgreSQL server not found: install Debian's postgresql (scripts/bootstrap does)")
    return candidates[-1]


def psql(socket_dir: Path, port: int, sql: str, *, database: str = "postgres", as_user: str | None = None,
         what: str = "psql") -> str:
    """Run ``sql`` as a cluster's superuser over its Unix socket; return the unaligned rows."""
    return run([str(find_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-tA", "-h", str(socket_dir),
                "-p", str(port), "-U", _ADMIN, "-d", database, "-c", sql], timeout=60, what=what, user=as_user)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Postgres(Service):
    name = "postgres"

    def __init__(self, paths: StackPaths, settings: Settings) -> None:
        self.paths = paths
        self.settings = settings
        self.port = loopback_port("IOTFLOW_PG_DSN", settings.pg_dsn)
        tsdb_port = loopback_port("IOTFLOW_TSDB_DSN", settings.tsdb_dsn)
        if tsdb_port != self.port:
            raise StackError(
                f"the local stack runs one PostgreSQL: IOTFLOW_TSDB_DSN port {tsdb_port} "
                f"differs from IOTFLOW_PG_DSN port {self.port}"
            )
        self.home = paths.service_dir("postgres")
        self.data = self.home / "data"
        self.socket_dir = self.home / "run"
        self.log_file = paths.logs / "postgres.log"
        self.as_user = _ADMIN if os.geteuid() == 0 else None

    def _bin(self, name: str) -> str:
        return str(find_bindir() / name)

    def _prepare_dirs(self) -> None:
        for path in (self.home, self.socket_dir, self.paths.logs):
            path.mkdir(parents=True, exist_ok=True)
        self.log_file.touch()
        if self.as_user is None:
            return
        owner = pwd.getpwnam(self.as_user)
        for path in (self.home, self.socket_dir, self.log_file):
            shutil.chown(path, owner.pw_uid, owner.pw_gid)
        for parent in self.home.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise StackError(
                    f"{parent} is not searchable by other users, so the {self.as_user} user cannot reach "
                    f"{self.home}; put IOTFLOW_STACK_DIR under a folder with mode o+x"
                )

    def _init_cluster(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        pwfile = self.home / ".pwfile"
        pwfile.write_text("postgres\n")
        if self.as_user is not None:
            owner = pwd.getpwnam(self.as_user)
            shutil.chown(pwfile, owner.pw_uid, owner.pw_gid)
        try:
            run(
                [self._bin("initdb"), "-D", str(self.data), "-U", _ADMIN, "--pwfile", str(pwfile),
                 "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"],
                timeout=120,
                what="initdb",
                user=self.as_user,
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _server_options(self) -> str:
        return " ".join(
            [
                f"-p {self.port}",
                f"-k {self.socket_dir}",
                "-c listen_addresses=127.0.0.1",
                "-c max_connections=200",
                "-c shared_buffers=256MB",
                # Durability stays on: the reliability tests count rows after killing things.
                "-c fsync=on",
                "-c synchronous_commit=on",
                "-c log_min_duration_statement=1000",
            ]
        )

    def start(self) -> None:
        if not self._running():
            refuse_taken_ports(self.name, self.port)
            self._prepare_dirs()
            self._init_cluster()
            run(
                [self._bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log_file), "-w", "-t", "60",
                 "-o", self._server_options(), "start"],
                timeout=90,
                what=f"starting PostgreSQL (see {self.log_file})",
                user=self.as_user,
            )
        self._ensure_databases()

    def stop(self) -> None:
        if self._running():
            run([self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                timeout=90, what="stopping PostgreSQL", user=self.as_user)

    def status(self) -> ServiceStatus:
        up = self._running() and self._ready()
        return ServiceStatus(self.name, up, f"127.0.0.1:{self.port}", f"PostgreSQL {find_bindir().parent.name}")

    def _running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        argv = [self._bin("pg_ctl"), "-D", str(self.data), "status"]
        if self.as_user is not None:
            argv = ["runuser", "-u", self.as_user, "--", *argv]
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0

    def _ready(self) -> bool:
        done = subprocess.run([self._bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "3"],
                              capture_output=True, timeout=10, check=False)
        return done.returncode == 0

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        """Run ``sql`` as the cluster's superuser over the Unix socket; return the unaligned rows."""
        return psql(self.socket_dir, self.port, sql, database=database, as_user=self.as_user)

    def _ensure_databases(self) -> None:
        for dsn in dict.fromkeys((self.settings.pg_dsn, self.settings.tsdb_dsn)):
            parts = urlsplit(dsn)
            user = unquote(parts.username or "iotflow")
            password = unquote(parts.password or "")
            database = unquote(parts.path.lstrip("/") or user)
            if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = {quote_literal(user)}").strip():
                login = f"LOGIN PASSWORD {quote_literal(password)}" if password else "LOGIN"
                self.psql(f"CREATE ROLE {quote_ident(user)} {login}")
            # A local stack's role may make scratch databases (the migration tests roll down in one).
            self.psql(f"ALTER ROLE {quote_ident(user)} CREATEDB")
            if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = {quote_literal(database)}").strip():
                self.psql(f"CREATE DATABASE {quote_ident(database)} OWNER {quote_ident(user)}")
