from __future__ import annotations

from click.testing import CliRunner

from iotflow.cli import main


def test_help_lists_the_subcommands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "stack" in result.output
    assert "topics" in result.output


def test_stack_help_lists_up_down_status():
    result = CliRunner().invoke(main, ["stack", "--help"])
    assert result.exit_code == 0
    for command in ("up", "down", "status"):
        assert command in result.output


def test_a_bad_setting_stops_the_cli_with_the_variable_named():
    result = CliRunner().invoke(main, ["stack", "status"], env={"IOTFLOW_REDIS_URL": "nope"})
    assert result.exit_code == 1
    assert "IOTFLOW_REDIS_URL" in result.output
    assert "'nope'" in result.output


def test_an_unknown_service_is_refused():
    result = CliRunner().invoke(main, ["stack", "up", "zookeeper"])
    assert result.exit_code == 2
    assert "zookeeper" in result.output
