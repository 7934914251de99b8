"""What every local-stack service shares: paths, process control and waiting for health."""
from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from iotflow.errors import StackError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class StackPaths:
    root: Path

    @classmethod
    def at(cls, root: Path) -> StackPaths:
        return cls(root.resolve())

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def service_dir(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    up: bool
    address: str
    detail: str

    def line(self) -> str:
        return f"{self.name:<10} {'up' if self.up else 'down':<5} {self.address:<22} {self.detail}"


def loopback_port(setting: str, url_or_hostport: str) -> int:
    """The port of a loopback address from a setting; the local stack serves nothing else."""
    target = url_or_hostport.split(",")[0]
    parts = urlsplit(target if "://" in target else f"//{target}")
    if parts.hostname not in _LOOPBACK or parts.port is None:
        raise StackError(
            f"{setting}={url_or_hostport!r} does not point at the local stack "
            f"(expected a loopback host with a port, e.g. 127.0.0.1:PORT)"
        )
    return parts.port


@dataclass
class LocalNode:
    """One process of a throwaway group (a replica, a sentinel): its name, port and folder."""
    name: str
    port: int
    home: Path


def free_loopback_port(span: int = 1) -> int:
    """A port on 127.0.0.1 with ``span`` consecutive ports free from it, for throwaway servers and tests.

    Chosen below the kernel's ephemeral range: a port from ``bind(0)`` comes from that range, the one
    outgoing connections take their local ports from, so a busy run (Kafka clients, database pools) can
    take it between our choice and the server's bind. Below the range only another server would.
    """
    low, high = _BELOW_EPHEMERAL
    for _ in range(200):
        port = random.randrange(low, high - span + 1)
        ports = range(port, port + span)
        # Nothing is bound yet to a port handed out a moment ago: don't hand it out twice.
        if not any(p in _handed_out for p in ports) and all(_bindable(p) for p in ports):
            _handed_out.extend(ports)
            return port
    raise StackError(f"no {span} free consecutive port(s) on 127.0.0.1 in {low}-{high}")


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Above the local stack's fixed ports (11883 … 19093), below where the kernel picks ephemeral ports.
_BELOW_EPHEMERAL = (20000, max(_ephemeral_floor(), 21000))
_handed_out: collections.deque[int] = collections.deque(maxlen=256)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a service's log for an error message (a missing log says so)."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - chars))
            return log.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"


def port_taken(port: int) -> bool:
    """True when something already listens on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def refuse_taken_ports(name: str, *ports: int) -> None:
    """Before starting ``name``: a port already served by another process is an error, not a success."""
    for port in ports:
        if port_taken(port):
            raise StackError(
                f"127.0.0.1:{port} is already in use by a process this stack did not start; "
                f"stop it or give {name} another port in the settings"
            )


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        for candidate in (Path("/usr/sbin") / name, Path("/usr/bin") / name):
            if candidate.exists():
                return str(candidate)
        raise StackError(f"{name} not found: install Debian's {package} (scripts/bootstrap does)")
    return path


def run(cmd: Sequence[str], *, timeout: float, what: str, user: str | None = None) -> str:
    """Run ``cmd`` to completion (as ``user`` when we are root) and return its stdout."""
    argv = list(cmd)
    if user is not None and os.geteuid() == 0:
        argv = ["runuser", "-u", user, "--", *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise StackError(f"{what}: no answer within {timeout:.0f}s ({' '.join(argv)})") from None
    if done.returncode != 0:
        raise StackError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``check`` until it is true; raise :class:`StackError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise StackError(f"{what} within {timeout:.0f}s")
        time.sleep(interval)


def read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child not yet reaped) still answers kill(0): treat it as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def stop_pid(pid_file: Path, *, name: str, timeout: float) -> None:
    """SIGTERM the process in ``pid_file``, wait for it to exit, SIGKILL after ``timeout``."""
    pid = read_pid(pid_file)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not pid_alive(pid), timeout=timeout, what=f"{name} did not exit on SIGTERM")
    except StackError:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), timeout=10, what=f"{name} did not exit on SIGKILL")
    pid_file.unlink(missing_ok=True)


class Service(ABC):
    """One process of the local stack."""

    name: str

    @abstractmethod
    def start(self) -> None:
        """Install what is missing, start the process unless it runs, return once it is healthy."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the process, keeping its data."""

    @abstractmethod
    def status(self) -> ServiceStatus:
        """Whether the process runs and answers a real request."""
