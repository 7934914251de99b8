"""Helpers for testing against a real iotflow worker, shipped for users' tests too.

:class:`WorkerProcess` runs ``faust -A iotflow worker`` as a child process with its own
settings, waits for it to be ready and stops it the way an operator would (SIGTERM) or the
way a crash would (SIGKILL).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

READY_LINE = "Worker ready"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get_json(url: str, *, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``url``; return the status and the decoded JSON body (None when not JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


class WorkerProcess:
    """One ``faust -A iotflow worker`` process with the given ``IOTFLOW_*`` overrides."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, cwd: Path | None = None) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.cwd = cwd
        self.web_port = int(self.env.get("IOTFLOW_WEB_PORT", "6066"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> WorkerProcess:
        faust = Path(sys.executable).with_name("faust")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(faust), "-A", "iotflow", "worker", "-l", "info"],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def log_text(self) -> str:
        """What this run of the worker has logged so far."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until the worker has its partitions, recovered its tables and serves HTTP."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            if READY_LINE in self.log_text():
                try:
                    if http_get_json(f"{self.url}/health/live", timeout=2)[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready within {timeout}s:\n{self.log_text()[-4000:]}")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, as an operator or an orchestrator stops a worker; return the exit code."""
        return self._stop(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL: a crash at an arbitrary point."""
        return self._stop(signal.SIGKILL, 10.0)

    def _stop(self, sig: signal.Signals, timeout: float) -> int:
        assert self.proc is not None, "worker not started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
