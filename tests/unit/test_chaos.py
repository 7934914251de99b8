"""`iotflow chaos` runs real scenario tests; these check its catalogue and its table."""
from __future__ import annotations

import ast
from pathlib import Path

from iotflow.chaos import SCENARIOS, _outcomes, extras, table

ROOT = Path(__file__).resolve().parents[2]


def test_every_scenario_names_a_test_that_exists_and_records_its_figures():
    for name, node in SCENARIOS.items():
        path, function = node.split("::")
        tree = ast.parse((ROOT / path).read_text())
        tests = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        assert function in tests, (name, node)
        assert "chaos" in [a.arg for a in tests[function].args.args], f"{name}: its test does not record figures"


def test_the_table_has_a_row_per_scenario_and_says_whether_it_held():
    rows = [{"scenario": "worker-kill", "fault": "worker kill -9 ×3", "sent": 102000, "stored": 100000, "lost": 0,
             "duplicated": 0, "dlq": 0, "recovery_s": 41.5, "passed": True},
            {"scenario": "redis-stop", "fault": "(no figures: it failed before them)", "passed": False}]
    text = table(rows).splitlines()
    assert text[0].startswith("| scenario | fault | sent | stored | lost | duplicated | dlq |")
    assert text[2] == "| worker-kill | worker kill -9 ×3 | 102000 | 100000 | 0 | 0 | 0 |  |  | 41.5 | yes |"
    assert text[3].endswith("| NO |")


def test_figures_beyond_the_columns_are_listed_per_scenario():
    rows = [{"scenario": "thundering-herd", "test": "t::x", "fault": "f", "sent": 1, "reconnected_s": 9.5,
             "bridge_rss_growth_mib": 3.0, "passed": True},
            {"scenario": "redis-stop", "fault": "f", "requests": 5, "passed": True}]
    assert extras(rows) == "- thundering-herd: reconnected_s 9.5, bridge_rss_growth_mib 3.0"


def test_outcomes_come_from_pytest_junit_xml(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase name="test_a"/><testcase name="test_b"><failure/></testcase>'
                     '</testsuite></testsuites>')
    assert _outcomes(junit) == {"test_a": True, "test_b": False}
    assert _outcomes(tmp_path / "missing.xml") == {}


def test_the_command_help_names_every_scenario():
    from click.testing import CliRunner

    from iotflow.chaos import SCENARIOS
    from iotflow.cli import main

    shown = CliRunner().invoke(main, ["chaos", "--help"]).output
    assert [name for name in SCENARIOS if name not in shown] == []
