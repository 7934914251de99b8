"""The API driven from its own OpenAPI document by schemathesis: no request makes it answer 5xx,
and every answer matches what the document says of it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from iotflow.testing import http_json, wait_for

SCHEMATHESIS = Path(sys.executable).with_name("st")


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(start_worker, tmp_path):
    worker = start_worker()
    worker.wait_ready()
    # Ready = it can route table views too (right after start Faust's router cannot: 5xx).
    assert wait_for(lambda: http_json("GET", f"{worker.url}/health/ready")[0] == 200, timeout=120), (
        http_json("GET", f"{worker.url}/health/ready"))
    status, _, served = http_json("GET", f"{worker.url}/api/v1/openapi.json")
    assert status == 200 and served["openapi"].startswith("3.1")
    token = worker.bearer("admin")["Authorization"]
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{worker.url}/api/v1/openapi.json",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
         "--header", f"Authorization: {token}",
         "--max-examples", "25", "--request-timeout", "10", "--workers", "1",
         "--generation-deterministic", "--generation-codec", "ascii"],
        capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert counts and int(counts[1]) == int(counts[2]) >= 100, run.stdout[-3000:]  # it really ran
    # Every documented operation but the document's own (schemathesis does not test its source).
    operations = sum(len(ops) for ops in served["paths"].values()) - 1
    assert f"Tested: {operations}" in run.stdout, run.stdout[-3000:]
