"""A PostgreSQL primary with a synchronous streaming replica on loopback (Debian's server
binaries), for the primary-failover test and chaos scenario.

The replica is a ``pg_basebackup`` of the primary, streaming from it. Replication is synchronous
(``synchronous_standby_names = '*'`` once the replica streams, ``synchronous_commit = on``): the primary acknowledges a
commit only once the replica has it, so promoting the replica after the primary dies loses no
transaction a client saw committed. That is the promise iotflow's "0 lost for committed data"
rests on — with asynchronous replication the last commits before a crash can be missing from the
promoted replica while Kafka's offsets already moved past them. The replica itself has no
synchronous standby configured, so once promoted it commits alone (until a new replica joins).

The app reaches the pair by :attr:`PostgresPair.dsn`: both hosts with
``target_session_attrs=read-write``, so asyncpg connects to whichever one is the primary.
Every process gets its own folder and port under ``root``; :meth:`PostgresPair.stop` stops both.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
from pathlib import Path

from iotflow.errors import StackError
from iotflow.stack.base import LocalNode, free_loopback_port, pid_alive, run, wait_until
from iotflow.stack.postgres import find_bindir, psql, quote_ident, quote_literal

_ADMIN = "postgres"
_ADMIN_PASSWORD = "postgres"  # a throwaway pair on loopback; the replica's connection uses it


class _Node(LocalNode):
    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_file(self) -> Path:
        return self.home / "postgres.log"

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None


class PostgresPair:
    def __init__(self, root: Path, *, user: str = "iotflow", password: str = "iotflow",
                 database: str = "iotflow") -> None:
        self.root = root.absolute()
        self.user, self.password, self.database = user, password, database
        self.primary = _Node("pg-primary", free_loopback_port(), self.root / "primary")
        self.replica = _Node("pg-replica", free_loopback_port(), self.root / "replica")
        self.as_user = _ADMIN if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in (self.primary, self.replica))
        return (f"postgresql://{self.user}:{self.password}@{hosts}/{self.database}"
                "?target_session_attrs=read-write")

    def _bin(self, name: str) -> str:
        return str(find_bindir() / name)

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.as_user is not None:
            owner = pwd.getpwnam(self.as_user)
            shutil.chown(path, owner.pw_uid, owner.pw_gid)

    def start(self) -> PostgresPair:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        if self.as_user is not None:
            for parent in self.root.parents:
                if not os.stat(parent).st_mode & 0o001:
                    raise StackError(f"{parent} is not searchable by other users, so the {self.as_user} user "
                                     f"cannot reach {self.root}: put the pair under the stack folder")
        for path in (self.root, self.primary.home, self.primary.socket_dir, self.replica.home,
                     self.replica.socket_dir):
            self._own(path)
        self._init_primary()
        self._start(self.primary)
        self._create_app_database()
        run([self._bin("pg_basebackup"), "-D", str(self.replica.data), "-X", "stream", "-R", "-c", "fast",
             "-d", f"host=127.0.0.1 port={self.primary.port} user={_ADMIN} password={_ADMIN_PASSWORD}"],
            timeout=120, what="pg_basebackup of the primary", user=self.as_user)
        with open(self.replica.data / "postgresql.conf", "a") as conf:  # later lines win
            conf.write(self._node_conf(self.replica) + "synchronous_standby_names = ''\n")
        self._start(self.replica)
        # Only now: with no standby connected, every commit would wait for one (creating the role too).
        self.psql(self.primary, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        self.psql(self.primary, "SELECT pg_reload_conf()")
        wait_until(lambda: self.sync_state() == "sync", timeout=60,
                   what="the replica did not become the primary's synchronous standby")
        return self

    def _init_primary(self) -> None:
        pwfile = self.primary.home / ".pwfile"
        pwfile.write_text(_ADMIN_PASSWORD + "\n")
        if self.as_user is not None:
            owner = pwd.getpwnam(self.as_user)
            shutil.chown(pwfile, owner.pw_uid, owner.pw_gid)
        try:
            run([self._bin("initdb"), "-D", str(self.primary.data), "-U", _ADMIN, "--pwfile", str(pwfile),
                 "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"],
                timeout=120, what="initdb of the primary", user=self.as_user)
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.primary.data / "postgresql.conf", "a") as conf:
            conf.write(self._node_conf(self.primary) + "\n".join([
                "wal_level = replica",
                "max_wal_senders = 4",
                "synchronous_commit = on",
                "",
            ]))

    @staticmethod
    def _node_conf(node: _Node) -> str:
        return "\n".join([
            "",
            f"port = {node.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{node.socket_dir}'",
            "max_connections = 100",
            "shared_buffers = 64MB",
            "fsync = on",  # durability stays on: the test counts rows after a SIGKILL
            "",
        ])

    def _start(self, node: _Node) -> None:
        run([self._bin("pg_ctl"), "-D", str(node.data), "-l", str(node.log_file), "-w", "-t", "60", "start"],
            timeout=90, what=f"starting {node.name} (see {node.log_file})", user=self.as_user)

    def psql(self, node: _Node, sql: str, *, database: str = "postgres") -> str:
        return psql(node.socket_dir, node.port, sql, database=database, as_user=self.as_user,
                    what=f"psql on {node.name}")

    def _create_app_database(self) -> None:
        self.psql(self.primary, f"CREATE ROLE {quote_ident(self.user)} LOGIN PASSWORD {quote_literal(self.password)}")
        self.psql(self.primary, f"CREATE DATABASE {quote_ident(self.database)} OWNER {quote_ident(self.user)}")

    def sync_state(self) -> str | None:
        """The replica's state as the primary sees it (``sync`` once commits wait for it)."""
        try:
            return self.psql(self.primary, "SELECT sync_state FROM pg_stat_replication").strip() or None
        except StackError:
            return None

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster and every process it started (a crashed host)."""
        pid = self.primary.postmaster_pid()
        if pid is None:
            raise StackError("the primary is not running")
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == pid]
        for victim in (pid, *children):
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not any(pid_alive(p) for p in (pid, *children)), timeout=10,
                   what="the primary's processes did not exit on SIGKILL")

    def promote(self) -> None:
        """Make the replica the primary (``pg_ctl promote``, waiting until it accepts writes)."""
        run([self._bin("pg_ctl"), "-D", str(self.replica.data), "-w", "-t", "60", "promote"],
            timeout=90, what="promoting the replica", user=self.as_user)

    def is_primary(self, node: _Node) -> bool:
        try:
            return self.psql(node, "SELECT pg_is_in_recovery()").strip() == "f"
        except StackError:
            return False

    def stop(self) -> None:
        """Stop both servers (immediately: the pair is thrown away) and delete their folders."""
        for node in (self.replica, self.primary):
            if node.postmaster_pid() is not None:
                run([self._bin("pg_ctl"), "-D", str(node.data), "-m", "immediate", "-w", "-t", "60", "stop"],
                    timeout=90, what=f"stopping {node.name}", user=self.as_user)
        shutil.rmtree(self.root, ignore_errors=True)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None
