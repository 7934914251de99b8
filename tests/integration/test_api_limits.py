"""The API's limits on a real worker: per-subject rate limits of mutating requests (429 with
Retry-After), bounded request bodies (413, declared or chunked, without the worker's memory
growing), and the security headers."""
from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from iotflow.testing import bearer, http_json, rss_kib, telemetry, wait_for

pytestmark = pytest.mark.timeout(240)

LIMIT = 64 * 1024


@pytest.fixture
def worker(start_worker):
    worker = start_worker(IOTFLOW_API_WRITE_RATE_PER_S="2", IOTFLOW_API_WRITE_BURST="5",
                          IOTFLOW_API_MAX_BODY_BYTES=str(LIMIT))
    worker.wait_ready()
    return worker


def test_mutating_requests_over_a_subjects_rate_get_429_with_retry_after(worker, settings, run_id):
    devices = f"{worker.url}/api/v1/devices"
    alice, bob = bearer(settings, "admin", f"alice-{run_id}"), bearer(settings, "admin", f"bob-{run_id}")
    answers = [http_json("POST", devices, {"id": f"rl-{run_id}-{i}", "name": "n", "type": "t"}, headers=alice)
               for i in range(7)]
    assert [a[0] for a in answers[:5]] == [201] * 5  # the burst
    status, headers, problem = answers[5]
    assert status == 429 and int(headers["Retry-After"]) >= 1 and problem["title"] == "Too many requests", problem
    assert headers["Content-Type"].startswith("application/problem+json")
    # Reads are not limited; another subject has its own budget; a refused request cost nothing.
    assert http_json("GET", f"{devices}/rl-{run_id}-0", headers=alice)[0] == 200
    assert http_json("POST", devices, {"id": f"rl-{run_id}-bob", "name": "n", "type": "t"}, headers=bob)[0] == 201
    time.sleep(int(headers["Retry-After"]))
    assert http_json("POST", devices, {"id": f"rl-{run_id}-7", "name": "n", "type": "t"}, headers=alice)[0] == 201
    # Telemetry over HTTP is not rate limited (devices are bounded there by Kafka's confirmation).
    ingest = f"{worker.url}/api/v1/ingest"
    statuses = {http_json("POST", ingest, [json.loads(telemetry(f"rl-{run_id}-0", seq))], headers=alice)[0]
                for seq in range(12)}
    assert statuses == {202}


def _raw_post(url: str, headers: dict[str, str], head_only: dict[str, str], chunks, read: bool = True):
    """POST with the given framing over a plain socket; the status line and headers, if ``read``."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    try:
        lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
                 *(f"{k}: {v}" for k, v in {**headers, **head_only}.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed before the body ended: what a bound does
        if not read:
            return None
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        head = answer.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
        return int(head[0].split()[1]), {k.lower(): v for k, v in (line.split(": ", 1) for line in head[1:])}
    finally:
        sock.close()


def _chunked(total: int, size: int = 16 * 1024):
    piece = b"[" + b" " * (size - 1)
    sent = 0
    while sent < total:
        yield f"{size:x}\r\n".encode() + piece + b"\r\n"
        piece = b" " * size
        sent += size
    yield b"0\r\n\r\n"


def test_bodies_over_the_bound_get_413_declared_or_chunked_without_memory_growth(worker, settings, run_id):
    url = f"{worker.url}/api/v1/devices"
    admin = bearer(settings, "admin", f"big-{run_id}")
    big = json.dumps({"id": f"big-{run_id}", "name": "x" * (LIMIT + 10), "type": "t"}).encode()
    status, headers, problem = http_json("POST", url, big, headers=admin)
    assert status == 413 and problem["limit_bytes"] == LIMIT, problem
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"

    # Chunked (no Content-Length): refused once the bound is passed, while the client still sends.
    status, headers = _raw_post(url, admin, {"Transfer-Encoding": "chunked"}, _chunked(4 * LIMIT))
    assert status == 413 and headers["content-type"].startswith("application/problem+json")
    before = rss_kib(worker.proc.pid)
    for _ in range(3):  # 3 × 64 MiB offered, each cut off at the bound
        _raw_post(url, admin, {"Transfer-Encoding": "chunked"}, _chunked(64 * 1024 * 1024), read=False)
    assert rss_kib(worker.proc.pid) - before < 32 * 1024, (before, rss_kib(worker.proc.pid))
    # A body within the bound is still taken, and the worker answers as before.
    small = {"id": f"small-{run_id}", "name": "n", "type": "t"}
    assert wait_for(lambda: http_json("POST", url, small, headers=admin)[0] == 201, timeout=10)
    status, headers, _ = http_json("GET", f"{worker.url}/api/v1/devices/small-{run_id}", headers=admin)
    assert status == 200 and headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
