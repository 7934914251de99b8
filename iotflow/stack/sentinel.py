"""A Redis replication group under Sentinel on loopback: one master, one replica, three sentinels
(Debian's redis-server and redis-sentinel), for failover tests and chaos scenarios.

Every process gets its own folder, ports and pid file under ``root``; :meth:`SentinelGroup.stop`
stops them all. The app reaches the group by :attr:`SentinelGroup.url`
(``redis+sentinel://host:port,…/<master name>/0``, see iotflow/cache.py).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from iotflow.stack.base import LocalNode, free_loopback_port, pid_alive, read_pid, require_binary, run, stop_pid, wait_until

MASTER_NAME = "iotflow"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class _Node(LocalNode):
    @property
    def pid_file(self) -> Path:
        return self.home / f"{self.name}.pid"


class SentinelGroup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.master = _Node("redis-a", free_loopback_port(), root / "redis-a")
        self.replica = _Node("redis-b", free_loopback_port(), root / "redis-b")
        self.sentinels = [_Node(f"sentinel-{i}", free_loopback_port(), root / f"sentinel-{i}") for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> SentinelGroup:
        server = require_binary("redis-server", "redis-server")
        sentinel = require_binary("redis-sentinel", "redis-sentinel")
        for node, extra in ((self.master, []), (self.replica, ["--replicaof", "127.0.0.1", str(self.master.port)])):
            node.home.mkdir(parents=True, exist_ok=True)
            run([server, "--bind", "127.0.0.1", "--port", str(node.port), "--dir", str(node.home),
                 "--daemonize", "yes", "--pidfile", str(node.pid_file), "--logfile", str(node.home / "redis.log"),
                 "--save", "", "--appendonly", "no", *extra], timeout=30, what=f"starting {node.name}")
        wait_until(lambda: self._replica_in_sync(), timeout=30, what="the replica did not sync with the master")
        for node in self.sentinels:
            node.home.mkdir(parents=True, exist_ok=True)
            config = node.home / "sentinel.conf"  # Sentinel rewrites its config: one file per sentinel
            config.write_text("\n".join([
                "bind 127.0.0.1",
                f"port {node.port}",
                f"dir {node.home}",
                "daemonize yes",
                f"pidfile {node.pid_file}",
                f"logfile {node.home / 'sentinel.log'}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} {QUORUM}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
                "",
            ]))
            run([sentinel, str(config)], timeout=30, what=f"starting {node.name}")
        wait_until(lambda: self.master_port() == self.master.port and self._sentinels_agree(),
                   timeout=30, what="the sentinels did not agree on the master")
        return self

    def master_port(self) -> int | None:
        """The master's port as the first answering sentinel sees it."""
        import redis

        for node in self.sentinels:
            client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1, socket_connect_timeout=1)
            try:
                host_port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(host_port[1]) if host_port else None
            except redis.RedisError:
                continue
            finally:
                client.close()
        return None

    def kill_master(self) -> int:
        """SIGKILL the current master (a crashed host); returns the port it had."""
        port = self.master_port()
        node = next(n for n in (self.master, self.replica) if n.port == port)
        pid = read_pid(node.pid_file)
        assert pid is not None, f"{node.name} is not running"
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), timeout=10, what=f"{node.name} did not exit on SIGKILL")
        return node.port

    def stop(self) -> None:
        for node in (*self.sentinels, self.replica, self.master):
            if read_pid(node.pid_file) is not None:
                stop_pid(node.pid_file, name=node.name, timeout=10)

    def _replica_in_sync(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.replica.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return client.info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _sentinels_agree(self) -> bool:
        import redis

        for node in self.sentinels:
            client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1, socket_connect_timeout=1)
            try:
                if int(client.sentinel_master(MASTER_NAME).get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True
