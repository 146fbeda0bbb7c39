"""Shared fixtures and helpers: real storages (a SQLite file per test, the real PostgreSQL),
study files, `search` subprocesses, waits with deadlines and the exact-budget check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import FrozenTrial, TrialState

from search.storage import mask_url, normalize_url, open_storage

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "SEARCH_TEST_POSTGRES_URL"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the real PostgreSQL (the `pg_url` fixture) carries `postgres`."""
    for item in items:
        if "pg_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The real PostgreSQL test database, created when the server lacks it.

    Unreachable is a failure, never a skip.
    """
    url = os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES)
    try:
        if not _database_exists(url):
            _create_database(url)
    except sqlalchemy.exc.OperationalError as e:
        pytest.fail(f"PostgreSQL at {mask_url(url)} is not reachable ({e.orig}); start it or "
                    f"set {POSTGRES_ENV}", pytrace=False)
    return url


def _database_exists(url: str) -> bool:
    engine = sqlalchemy.create_engine(normalize_url(url), connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
        return True
    except sqlalchemy.exc.OperationalError as e:
        if "does not exist" not in str(e.orig):
            raise
        return False
    finally:
        engine.dispose()


def _create_database(url: str) -> None:
    """CREATE DATABASE through the server's `postgres` database (a race with another run that
    creates it at the same moment is fine)."""
    target = sqlalchemy.engine.make_url(normalize_url(url))
    admin = sqlalchemy.create_engine(
        target.set(database="postgres"),
        connect_args={"connect_timeout": 5},
        isolation_level="AUTOCOMMIT",
    )
    quoted = admin.dialect.identifier_preparer.quote(target.database or "")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {quoted}"))
    except sqlalchemy.exc.ProgrammingError as e:
        if "already exists" not in str(e.orig):
            raise
    finally:
        admin.dispose()


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


def survivors_and_pruned() -> list[FrozenTrial]:
    """5 complete trials reaching 0.30-0.38 over 25 epochs and 10 pruned at epoch 5 near
    1.8: the complete ones are the survivors of a pruned study, so their median is no
    measure of "good"."""
    trials = []
    for i in range(5):
        end = 0.3 + 0.02 * i
        values = {e + 1: 2.0 * (end / 2.0) ** (e / 24) for e in range(25)}
        trials.append(optuna.trial.create_trial(value=end, intermediate_values=values))
    for i in range(10):
        values = {e + 1: 2.0 - 0.05 * e - 0.01 * i for e in range(5)}
        trials.append(
            optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values=values)
        )
    for number, trial in enumerate(trials):
        trial.number = number
    return trials


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


# --- `search` processes, waits and the exact budget ----------------------------------------

_T = TypeVar("_T")


def search_command(*args: str) -> list[str]:
    """The argv of a real `search ...` process run by this interpreter."""
    return [sys.executable, "-m", "search", *args]


def start_worker(
    name: str, url: str, log_dir: Path, worker_id: str, *extra: str, epoch_seconds: float = 0.3
) -> subprocess.Popen[bytes]:
    """A real `search worker` process on study `name`; its output goes to `worker_log`."""
    log = (log_dir / f"{worker_id}.log").open("wb")
    return subprocess.Popen(
        search_command("worker", name, "--worker-id", worker_id, *extra),
        env=cli_env(url, SEARCH_TEST_EPOCH_SECONDS=str(epoch_seconds)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def worker_log(log_dir: Path, worker_id: str) -> str:
    return (log_dir / f"{worker_id}.log").read_text()


def wait_for(predicate: Callable[[], _T | None], timeout: float, what: str) -> _T:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def exact_trials(study: optuna.Study, n: int) -> list[FrozenTrial]:
    """`study`'s trials, asserting its budget was met exactly: `n` finished (COMPLETE +
    PRUNED), nothing RUNNING or WAITING."""
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    return trials


def load_trials(url: str, name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()


def running_with_epochs(url: str, name: str, epochs: int) -> FrozenTrial | None:
    """A RUNNING trial with at least `epochs` reported epochs; None (also while the study does
    not exist yet)."""
    try:
        found = load_trials(url, name)
    except KeyError:
        return None
    for trial in found:
        if trial.state == TrialState.RUNNING and len(trial.intermediate_values) >= epochs:
            return trial
    return None


def assert_exact_budget(url: str, name: str, n: int) -> optuna.Study:
    """The budget is met exactly: `n` finished (COMPLETE + PRUNED), nothing RUNNING or WAITING,
    no trial number twice."""
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    found = study.get_trials()
    states = Counter(t.state for t in found)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    numbers = [t.number for t in found]
    assert len(numbers) == len(set(numbers)), numbers
    return study
