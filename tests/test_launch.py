"""End to end: `search launch` with real worker processes on SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import REPO, base_spec, cli_env, sleepy_spec
from optuna.trial import TrialState

from search.storage import open_storage

pytestmark = pytest.mark.slow


def _launch(spec_path: Path, storage: str, *args: str, timeout: float = 240
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "search", "launch", str(spec_path), "--storage", storage,
         "--no-progress", *args],
        capture_output=True, text=True, timeout=timeout, cwd=spec_path.parent, env=cli_env())


def _check_exact_study(storage: str, name: str, n: int) -> optuna.Study:
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    return study


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_launch_runs_exactly_n_trials_with_two_workers(
        backend: str, request: pytest.FixtureRequest, study_name: str, write_spec) -> None:
    storage = (request.getfixturevalue("pg_url") if backend == "postgres"
               else request.getfixturevalue("sqlite_url"))
    spec_path = write_spec(base_spec(study_name, n_trials=20, epochs=3))
    result = _launch(spec_path, storage, "--n-trials", "7", "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best trial" in result.stdout
    study = _check_exact_study(storage, study_name, 7)
    assert study.user_attrs["spec"]["name"] == study_name
    assert study.user_attrs["n_trials"] == 7
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2, "both worker processes took trials"
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for trial in done:
        assert set(trial.params) == {"lr", "batch_size", "depth", "width"}
        rows = trial.user_attrs["epoch_metrics"]
        assert [r["epoch"] for r in rows] == sorted(trial.intermediate_values)
        assert {"val_accuracy", "train_loss", "lr", "grad_norm", "epoch_seconds"} <= set(rows[0])
    assert "password" not in result.stderr


def test_launch_continues_an_existing_study(sqlite_url: str, study_name: str, write_spec) -> None:
    spec_path = write_spec(base_spec(study_name, epochs=2))
    assert _launch(spec_path, sqlite_url, "--n-trials", "3", "--workers", "1").returncode == 0
    again = _launch(spec_path, sqlite_url, "--n-trials", "5", "--workers", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    _check_exact_study(sqlite_url, study_name, 5)


def test_conflicting_spec_on_existing_study_is_refused(sqlite_url: str, study_name: str,
                                                       write_spec) -> None:
    spec_path = write_spec(base_spec(study_name, epochs=2))
    assert _launch(spec_path, sqlite_url, "--n-trials", "1", "--workers", "1").returncode == 0
    changed = base_spec(study_name, epochs=2, direction="maximize")
    result = _launch(write_spec(changed, "changed.yaml"), sqlite_url, "--workers", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"Error: study '{study_name}' already exists with a different definition (direction")
    assert "Traceback" not in result.stderr


def test_user_objective_study_from_the_repo(sqlite_url: str) -> None:
    result = _launch(REPO / "studies" / "quadratic_user.yaml", sqlite_url, "--n-trials", "6",
                     "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_exact_study(sqlite_url, "quadratic-user", 6)


def test_status_json_for_scripts(sqlite_url: str, study_name: str, write_spec) -> None:
    spec_path = write_spec(sleepy_spec(study_name, n_trials=3, epochs=1))
    assert _launch(spec_path, sqlite_url, "--workers", "1").returncode == 0
    out = subprocess.run([sys.executable, "-m", "search", "status", study_name, "--storage",
                          sqlite_url, "--json"], capture_output=True, text=True, env=cli_env(),
                         timeout=60, check=True).stdout
    data = json.loads(out)
    assert data["counts"]["COMPLETE"] + data["counts"]["PRUNED"] == 3
    assert data["n_trials"] == 3 and set(data["best_params"]) == {"x"}


def _wsgi_get(app, path: str) -> dict:
    from wsgiref.util import setup_testing_defaults

    environ: dict = {"PATH_INFO": path, "QUERY_STRING": "after=0"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, *_: status.append(s)))
    assert status[0].startswith("200"), status
    return json.loads(body)


def test_postgres_study_is_readable_by_optuna_dashboard_and_optuna_cli(
        pg_url: str, study_name: str, write_spec) -> None:
    import optuna_dashboard

    from search.storage import normalize_url

    spec_path = write_spec(base_spec(study_name, n_trials=3, epochs=2))
    assert _launch(spec_path, pg_url, "--workers", "1").returncode == 0
    storage = open_storage(pg_url)
    study_id = storage.get_study_id_from_name(study_name)
    data = _wsgi_get(optuna_dashboard.wsgi(storage), f"/api/studies/{study_id}")
    assert len(data["trials"]) == 3
    trial = data["trials"][0]
    assert {p["name"] for p in trial["params"]} == {"lr", "batch_size", "depth", "width"}
    assert trial["intermediate_values"]
    assert "epoch_metrics" in {a["key"] for a in trial["user_attrs"]}
    assert "spec" in {a["key"] for a in data["user_attrs"]}
    listed = subprocess.run(["optuna", "trials", "--study-name", study_name, "--storage",
                             normalize_url(pg_url), "-f", "json"], capture_output=True,
                            text=True, timeout=60, check=True, env=cli_env())
    assert len(json.loads(listed.stdout)) == 3
