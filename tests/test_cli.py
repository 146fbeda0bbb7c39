"""The CLI in-process (typer's CliRunner) and once as a real subprocess."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from conftest import base_spec, cli_env
from typer.testing import CliRunner

from search.cli import app

runner = CliRunner()
COMMAND = typer.main.get_command(app)  # typer 0.29 vendors click: use the tree duck-typed


@pytest.mark.parametrize("name", sorted(COMMAND.commands))
def test_every_command_and_option_has_help(name: str) -> None:
    command = COMMAND.commands[name]
    assert command.help, f"{name} has no help text"
    for param in command.params:
        if param.param_type_name == "option":
            assert param.help, f"{name} {param.opts} has no help text"
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_top_level_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("launch", "worker", "status", "create"):
        assert name in result.output


def test_bad_spec_exits_2_with_one_line(tmp_path, write_spec) -> None:
    path = write_spec({**base_spec("x"), "n_trials": -3})
    result = runner.invoke(app, ["launch", str(path), "--storage",
                                 f"sqlite:///{tmp_path / 'db.sqlite'}"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {path}: n_trials: Input should be greater than")


def test_unreachable_storage_exits_2_without_password() -> None:
    result = runner.invoke(app, ["status", "--storage",
                                 "postgresql://u:hunter2@127.0.0.1:1/db"])
    assert result.exit_code == 2
    assert "hunter2" not in result.output + result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "Error: cannot open storage postgresql://u:***@127.0.0.1:1/db (127.0.0.1:1/db): ")


def test_unknown_study_exits_2(sqlite_url: str) -> None:
    from search.storage import open_storage

    open_storage(sqlite_url)  # an existing database without that study (status creates none)
    result = runner.invoke(app, ["status", "nope", "--storage", sqlite_url])
    assert result.exit_code == 2
    assert "no study 'nope'" in result.stderr


@pytest.mark.parametrize("command", ["worker", "resume"])
def test_a_mistyped_sqlite_path_is_an_error_and_creates_nothing(
        tmp_path: Path, command: str) -> None:
    """A worker or a resume joins an existing study: a SQLite path that names no file is
    a one-line error (exit 2), not a new empty database beside the real one."""
    missing = tmp_path / "studdy.db"
    result = runner.invoke(app, [command, "digits-mlp", "--storage", f"sqlite:///{missing}"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"Error: no SQLite file {missing}: check the path in 'sqlite:///{missing}' "
        "(nothing was created)")
    assert list(tmp_path.iterdir()) == []


def test_create_then_status(sqlite_url: str, study_name: str, write_spec) -> None:
    path = write_spec(base_spec(study_name))
    created = runner.invoke(app, ["create", str(path), "--storage", sqlite_url, "--n-trials", "9"])
    assert created.exit_code == 0, created.output
    assert "budget 9 trials" in created.output
    listed = runner.invoke(app, ["status", "--storage", sqlite_url])
    assert listed.exit_code == 0 and study_name in listed.output


def test_worker_rejects_a_bad_device() -> None:
    result = runner.invoke(app, ["worker", "s", "--device", "tpu"])
    assert result.exit_code == 2
    assert "expected cpu or cuda:N" in result.output + result.stderr
    last = (result.stderr or result.output).strip().splitlines()[-1]
    assert last == "Error: Invalid value for --device: expected cpu or cuda:N, got 'tpu'"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["launch"], "Error: Missing argument 'SPEC'."),
        (["launch", "x.yaml", "--bogus"], "Error: No such option: --bogus"),
        (["launch", "x.yaml", "--n-trials", "abc"], "Error: Invalid value for '--n-trials': "),
        (["launch", "x.yaml", "--n-trials", "0"], "Error: Invalid value for '--n-trials': "),
        (["status", "--jsn"], "Error: No such option: --jsn"),
        (["lunch"], "Error: No such command 'lunch'."),
        (["--bogus"], "Error: No such option: --bogus"),
    ],
    ids=["missing-argument", "unknown-option", "not-an-int", "below-min", "status", "command",
         "top-level-option"],
)
def test_usage_error_is_one_plain_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert result.stdout == ""


def test_version() -> None:
    import search

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"search {search.__version__}\n"
    assert search.__version__ == importlib.metadata.version("gridfleet-search")


def test_real_subprocess_usage_error_is_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "search", "launch"], capture_output=True,
                            text=True, timeout=60, env=cli_env())
    assert result.returncode == 2
    assert result.stderr == "Error: Missing argument 'SPEC'.\n"


@pytest.mark.parametrize("command", [["status"], ["report", "x"]])
def test_a_review_command_on_a_missing_sqlite_file_is_one_line_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    result = subprocess.run([sys.executable, "-m", "search", *command, "--storage",
                             "sqlite:///typo.db"], capture_output=True, text=True,
                            env=cli_env(), timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "Error: no SQLite file typo.db: check the path in 'sqlite:///typo.db' (nothing was "
        "created)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_real_subprocess_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "search", "--help"], capture_output=True,
                            text=True, timeout=60, env=cli_env())
    assert result.returncode == 0
    assert "launch" in result.stdout
