"""Config precedence, one table: CLI flag > environment variable > study file > default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import base_spec
from typer.testing import CliRunner

from search import config
from search.cli import app
from search.exceptions import StorageError
from search.spec import StudySpec, spec_from_dict

ENV = {"storage": config.STORAGE_ENV, "connect_timeout": config.CONNECT_TIMEOUT_ENV}


def _resolve(setting: str, cli: Any, spec: StudySpec) -> Any:
    """Each setting the way its caller resolves it (cli.py, study.py, storage.py, worker.py)."""
    if setting == "storage":
        return config.storage_url(cli, spec.storage)
    if setting == "n_trials":
        return config.n_trials(cli, spec.n_trials)
    if setting == "checkpoint_dir":
        return config.checkpoint_dir(cli, spec.workers.checkpoint_dir)
    if setting == "connect_timeout":
        return config.connect_timeout(cli)
    assert setting == "max_failures" and cli is None  # no flag: the study file or the default
    return config.max_failures(spec.workers.max_failures, spec.n_trials)


def _workers(**fields: Any) -> dict[str, Any]:
    return {"workers": {**base_spec("x")["workers"], **fields}}


@pytest.mark.parametrize(
    ("setting", "cli", "env", "file", "expected"),
    [
        ("storage", "sqlite:///cli.db", "sqlite:///env.db", {"storage": "sqlite:///f.db"},
         "sqlite:///cli.db"),
        ("storage", None, "sqlite:///env.db", {"storage": "sqlite:///f.db"}, "sqlite:///env.db"),
        ("storage", None, "", {"storage": "sqlite:///f.db"}, "sqlite:///f.db"),
        ("storage", None, None, {}, "sqlite:///search.db"),
        ("n_trials", 7, None, {"n_trials": 9}, 7),
        ("n_trials", None, None, {"n_trials": 9}, 9),
        ("n_trials", None, None, {}, 20),
        ("checkpoint_dir", "/cli", None, _workers(checkpoint_dir="/f"), "/cli"),
        ("checkpoint_dir", None, None, _workers(checkpoint_dir="/f"), "/f"),
        ("checkpoint_dir", None, None, {}, None),
        ("connect_timeout", 5, "12", {}, 5),
        ("connect_timeout", None, "12", {}, 12.0),
        ("connect_timeout", None, "", {}, 30.0),
        ("connect_timeout", None, None, {}, 30.0),
        ("max_failures", None, None, {**_workers(max_failures=3), "n_trials": 40}, 3),
        ("max_failures", None, None, {"n_trials": 40}, 40),
        ("max_failures", None, None, {"n_trials": 2}, 5),
    ],
)
def test_precedence(monkeypatch: pytest.MonkeyPatch, setting: str, cli: Any, env: str | None,
                    file: dict[str, Any], expected: Any) -> None:
    for name in ENV.values():
        monkeypatch.delenv(name, raising=False)
    if env is not None:
        monkeypatch.setenv(ENV[setting], env)
    data = base_spec("x")
    data.pop("n_trials")  # the file's own default applies unless the row names it
    spec = spec_from_dict({**data, **file})
    assert _resolve(setting, cli, spec) == expected


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_connect_timeout_is_one_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                  value: str) -> None:
    monkeypatch.setenv(config.CONNECT_TIMEOUT_ENV, value)
    with pytest.raises(StorageError, match=f"SEARCH_CONNECT_TIMEOUT must be .* got '{value}'"):
        config.connect_timeout()


def test_the_cli_uses_the_environment_over_the_study_file(tmp_path: Path, write_spec,
                                                          study_name: str) -> None:
    from_file = f"sqlite:///{tmp_path / 'file.db'}"
    from_env = f"sqlite:///{tmp_path / 'env.db'}"
    path = write_spec({**base_spec(study_name), "storage": from_file})
    result = CliRunner().invoke(app, ["create", str(path)], env={config.STORAGE_ENV: from_env})
    assert result.exit_code == 0, result.output
    assert f"ready in {from_env}" in result.stdout
    assert (tmp_path / "env.db").exists() and not (tmp_path / "file.db").exists()
