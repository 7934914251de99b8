"""Redis (Debian's redis-server) on loopback, persisting to an append-only file."""
from __future__ import annotations

from iotflow.settings import Settings
from iotflow.stack.base import (
    Service,
    ServiceStatus,
    StackPaths,
    loopback_port,
    read_pid,
    refuse_taken_ports,
    require_binary,
    run,
    stop_pid,
    wait_until,
)


class Redis(Service):
    name = "redis"

    def __init__(self, paths: StackPaths, settings: Settings) -> None:
        self.paths = paths
        self.port = loopback_port("IOTFLOW_REDIS_URL", settings.redis_url)
        self.home = paths.service_dir("redis")
        self.pid_file = self.home / "redis.pid"
        self.log_file = paths.logs / "redis.log"

    def start(self) -> None:
        if self.status().up:
            return
        refuse_taken_ports(self.name, self.port)
        server = require_binary("redis-server", "redis-server")
        self.home.mkdir(parents=True, exist_ok=True)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        run(
            [server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.home),
             "--daemonize", "yes", "--pidfile", str(self.pid_file), "--logfile", str(self.log_file),
             "--appendonly", "yes", "--protected-mode", "yes"],
            timeout=30,
            what="starting redis-server",
        )
        wait_until(self._answers, timeout=30, what=f"Redis did not answer PING (see {self.log_file})")

    def stop(self) -> None:
        stop_pid(self.pid_file, name="redis", timeout=30)

    def status(self) -> ServiceStatus:
        pid = read_pid(self.pid_file)
        up = pid is not None and self._answers()
        return ServiceStatus(self.name, up, f"127.0.0.1:{self.port}", "Redis" + (f", pid {pid}" if pid else ""))

    def _answers(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
