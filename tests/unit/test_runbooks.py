"""Every command a runbook names exists, with the options it is given, and every endpoint it
curls is a route the worker serves. (What each command does is tested where it is built:
test_dlq.py, test_cache.py, test_cli.py, test_topics.py, test_migrate.py.)"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from iotflow.cli import main
from iotflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = sorted((ROOT / "docs/runbooks").glob("*.md"))


def commands() -> list[tuple[str, str]]:
    found = []
    for path in RUNBOOKS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.strip().splitlines():
                found.append((path.name, line.strip()))
                found += [(path.name, inner) for inner in re.findall(r"\$\((iotflow [^)]*)\)", line)]
    return found


def resolve(argv: list[str]) -> tuple[click.Command, list[str]]:
    command: click.Command = main
    rest = argv[1:]
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def test_the_runbooks_the_issue_asks_for_are_there():
    names = {path.stem for path in RUNBOOKS}
    assert {"consumer-lag", "timescaledb-disk-full", "redis-cache", "kafka-broker-down", "postgres-failover",
            "dlq", "table-recovery", "archive", "bad-rollout"} <= names
    operations = (ROOT / "docs/operations.md").read_text()
    assert all(f"runbooks/{name}.md" in operations for name in names), "docs/operations.md links every runbook"


def test_every_iotflow_command_in_a_runbook_exists_with_its_options():
    checked = 0
    for name, line in commands():
        if not line.startswith("iotflow "):
            continue
        command, rest = resolve(shlex.split(line))
        assert not isinstance(command, click.Group), f"{name}: {line!r} names no command"
        options = {opt for param in command.params for opt in param.opts}
        for token in rest:
            if token.startswith("--"):
                assert token in options, f"{name}: {line!r}: {token} is not an option of it"
        checked += 1
    assert checked >= 10


def test_every_endpoint_a_runbook_curls_is_served():
    from iotflow.app import create_app

    app = create_app(Settings.from_env({"IOTFLOW_JWT_SECRET": "x" * 40}))
    # A route's {placeholder} matches one path segment (a runbook writes e.g. ROLLOUT_ID there).
    routes = [re.compile(re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(route.resource.canonical)) + "$")
              for route in app.web.web_app.router.routes()]
    curled = [(name, path) for name, line in commands() if line.startswith("curl")
              for path in re.findall(r"http://WORKER:6066(/[^\s?\"']*)", line)]
    assert curled
    for name, path in curled:
        assert any(route.match(path) for route in routes), f"{name}: {path} is not a route of the worker"


def test_workers_are_started_as_the_readme_says():
    for name, line in commands():
        if line.startswith("faust"):
            assert line == "faust -A iotflow worker -l info", (name, line)
