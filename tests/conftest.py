"""Shared fixtures: real storages (a SQLite file per test, the real PostgreSQL), study files."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import yaml

from search.storage import normalize_url

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "SEARCH_TEST_POSTGRES_URL"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The real PostgreSQL test database. Unreachable is a failure, never a skip."""
    url = os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES)
    engine = sqlalchemy.create_engine(normalize_url(url), connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.OperationalError as e:
        pytest.fail(f"PostgreSQL at {url} is not reachable ({e.orig}); start it or set "
                    f"{POSTGRES_ENV}", pytrace=False)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def study_name() -> str:
    """A name no other test (or earlier run against the same PostgreSQL) has used."""
    return f"t-{uuid.uuid4().hex[:10]}"


def base_spec(name: str, **overrides: Any) -> dict[str, Any]:
    """A small, fast built-in-trainer spec (wine data) for tests; override any field."""
    spec: dict[str, Any] = {
        "name": name,
        "direction": "minimize",
        "metric": "val_loss",
        "n_trials": 4,
        "epochs": 3,
        "seed": 0,
        "sampler": {"type": "tpe", "n_startup_trials": 2},
        "space": {
            "lr": {"low": 1e-3, "high": 1e-1, "log": True},
            "batch_size": {"choices": [16, 32]},
            "depth": {"low": 1, "high": 2},
            "width": {"low": 8, "high": 32, "log": True},
        },
        "objective": {"dataset": "wine"},
        "workers": {"heartbeat_interval": 1, "grace_period": 4},
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write a spec dict to a YAML file and return its path."""

    def write(data: dict[str, Any], filename: str = "spec.yaml") -> Path:
        path = tmp_path / filename
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


TESTS = Path(__file__).resolve().parent


def cli_env(storage: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a real `search` subprocess: test objectives importable, storage set."""
    env = {k: v for k, v in os.environ.items() if k != "SEARCH_STORAGE"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if storage is not None:
        env["SEARCH_STORAGE"] = storage
    env.update(extra)
    return env


def sleepy_spec(name: str, **overrides: Any) -> dict[str, Any]:
    """A spec whose objective sleeps per epoch (tests/objectives.py), for crash tests."""
    spec: dict[str, Any] = {
        "name": name,
        "n_trials": 6,
        "epochs": 5,
        "seed": 0,
        "sampler": {"type": "tpe", "n_startup_trials": 3},
        "space": {"x": {"type": "float", "low": -1.0, "high": 1.0}},
        "objective": {"function": "objectives:sleepy"},
        "workers": {"heartbeat_interval": 1, "grace_period": 4},
    }
    spec.update(overrides)
    return spec
