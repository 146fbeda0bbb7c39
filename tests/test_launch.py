"""End to end: `search launch` with real worker processes on SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import (
    REPO,
    assert_exact_budget,
    base_spec,
    cli_env,
    search_command,
    sleepy_spec,
    wait_for,
)
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.storage import open_storage

pytestmark = pytest.mark.slow


def _launch(spec_path: Path, storage: str, *args: str, timeout: float = 240
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        search_command("launch", str(spec_path), "--storage", storage, "--no-progress", *args),
        capture_output=True, text=True, timeout=timeout, cwd=spec_path.parent, env=cli_env())


SECRET = "s3cr3t-Pa55"  # the local server trusts its roles: any password connects


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_launch_runs_exactly_n_trials_with_two_workers(
        backend: str, request: pytest.FixtureRequest, study_name: str, write_spec) -> None:
    storage = (make_url(request.getfixturevalue("pg_url")).set(password=SECRET)
               .render_as_string(hide_password=False) if backend == "postgres"
               else request.getfixturevalue("sqlite_url"))
    spec_path = write_spec(base_spec(study_name, n_trials=20, epochs=3))
    result = _launch(spec_path, storage, "--n-trials", "7", "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best trial" in result.stdout
    study = assert_exact_budget(storage, study_name, 7)
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
    logs = [p.read_text() for p in (spec_path.parent / "search-logs").rglob("*") if p.is_file()]
    assert logs, "the workers wrote logs"
    for text in [result.stdout, result.stderr, *logs]:
        assert SECRET not in text


def test_launch_continues_an_existing_study(sqlite_url: str, study_name: str, write_spec) -> None:
    spec_path = write_spec(sleepy_spec(study_name, epochs=2))
    assert _launch(spec_path, sqlite_url, "--n-trials", "3", "--workers", "1").returncode == 0
    again = _launch(spec_path, sqlite_url, "--n-trials", "5", "--workers", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert_exact_budget(sqlite_url, study_name, 5)


def test_conflicting_spec_on_existing_study_is_refused(sqlite_url: str, study_name: str,
                                                       write_spec) -> None:
    spec_path = write_spec(sleepy_spec(study_name, epochs=2))
    assert _launch(spec_path, sqlite_url, "--n-trials", "1", "--workers", "1").returncode == 0
    changed = sleepy_spec(study_name, epochs=2, direction="maximize")
    result = _launch(write_spec(changed, "changed.yaml"), sqlite_url, "--workers", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"Error: study '{study_name}' already exists with a different definition (direction")
    assert "Traceback" not in result.stderr


def test_user_objective_study_from_the_repo(sqlite_url: str) -> None:
    result = _launch(REPO / "studies" / "quadratic_user.yaml", sqlite_url, "--n-trials", "6",
                     "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exact_budget(sqlite_url, "quadratic-user", 6)


def test_status_json_for_scripts(sqlite_url: str, study_name: str, write_spec) -> None:
    spec_path = write_spec(sleepy_spec(study_name, n_trials=3, epochs=1))
    assert _launch(spec_path, sqlite_url, "--workers", "1").returncode == 0
    out = subprocess.run(search_command("status", study_name, "--storage", sqlite_url, "--json"),
                         capture_output=True, text=True, env=cli_env(), timeout=60,
                         check=True).stdout
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


def _popen_launch(spec_path: Path, storage: str, *args: str, **env: str
                  ) -> tuple[subprocess.Popen[bytes], Path]:
    stderr = spec_path.parent / f"launch-{len(list(spec_path.parent.glob('launch-*')))}.err"
    process = subprocess.Popen(
        [sys.executable, "-m", "search", "launch", str(spec_path), "--storage", storage,
         "--no-progress", *args],
        stdout=subprocess.DEVNULL, stderr=stderr.open("wb"), cwd=spec_path.parent,
        env=cli_env(**env))
    return process, stderr


def _running(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        return []
    return [t for t in study.trials if t.state == TrialState.RUNNING and "pid" in t.user_attrs]


def test_stopping_one_launcher_leaves_another_launchers_trials_alone(
        pg_url: str, study_name: str, write_spec, tmp_path: Path) -> None:
    spec_path = write_spec(sleepy_spec(study_name, n_trials=6, epochs=4))
    logs = ["--log-dir", str(tmp_path / "logs"), "--workers", "1"]
    first, first_err = _popen_launch(spec_path, pg_url, *logs)
    second, second_err = _popen_launch(spec_path, pg_url, *logs)
    wait_for(lambda: len({t.user_attrs["pid"] for t in _running(pg_url, study_name)}) == 2,
              90, "a running trial in each launcher")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 130, first_err.read_text()[-3000:]
    assert second.wait(timeout=240) == 0, second_err.read_text()[-3000:]
    study = assert_exact_budget(pg_url, study_name, 6)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.user_attrs["fail_reason"] for t in failed] == ["preempted"], (
        "only the stopped launcher's own trial is handed back")
    workers = {t.user_attrs["worker"] for t in study.trials if "worker" in t.user_attrs}
    assert len(workers) == 2, f"each launcher's worker has its own id: {workers}"
    assert len(list((tmp_path / "logs").glob("worker-0-*.log"))) == 2, "one log per launcher"


@pytest.mark.parametrize("exit_code", [3, 75], ids=["crash", "recycle"])
def test_a_worker_that_exits_after_every_trial_is_restarted_until_the_budget(
        sqlite_url: str, study_name: str, write_spec, exit_code: int) -> None:
    """Each worker process finishes one trial, then crashes (restart count starts again after
    a finished trial) or exits 75 (replaced at once, not a crash): 5 exits, 3 restarts max."""
    spec = sleepy_spec(study_name, n_trials=5, epochs=1,
                       objective={"function": "objectives:dies_after_one_trial"})
    process, stderr = _popen_launch(write_spec(spec), sqlite_url, "--workers", "1",
                                    SEARCH_TEST_EXIT_CODE=str(exit_code),
                                    SEARCH_TEST_EPOCH_SECONDS="0.1")
    assert process.wait(timeout=240) == 0, stderr.read_text()[-3000:]
    assert_exact_budget(sqlite_url, study_name, 5)
    log = stderr.read_text()
    if exit_code == 75:
        assert "asked to be replaced" in log and "crashed" not in log
    else:
        assert "is healthy again" in log and "not restarting" not in log


def test_a_worker_stopped_by_someone_else_is_restarted(
        sqlite_url: str, study_name: str, write_spec) -> None:
    spec_path = write_spec(sleepy_spec(study_name, n_trials=3, epochs=3))
    process, stderr = _popen_launch(spec_path, sqlite_url, "--workers", "1")
    (live,) = wait_for(lambda: _running(sqlite_url, study_name), 90, "a running trial")
    os.kill(live.user_attrs["pid"], signal.SIGTERM)
    assert process.wait(timeout=240) == 0, stderr.read_text()[-3000:]
    study = assert_exact_budget(sqlite_url, study_name, 3)
    assert "exited while the study is not done" in stderr.read_text()
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2, "a fresh worker took over"


def test_a_second_ctrl_c_hands_trials_back_and_exits_at_once(
        sqlite_url: str, study_name: str, write_spec) -> None:
    spec_path = write_spec(sleepy_spec(study_name, n_trials=2, epochs=2))
    process, stderr = _popen_launch(spec_path, sqlite_url, "--workers", "1",
                                    SEARCH_TEST_EPOCH_SECONDS="600")
    (live,) = wait_for(lambda: _running(sqlite_url, study_name), 90, "a running trial")
    process.send_signal(signal.SIGINT)
    wait_for(lambda: "signal again" in stderr.read_text(), 30, "the launcher to start stopping")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130, stderr.read_text()[-3000:]
    trials = optuna.load_study(study_name=study_name, storage=open_storage(sqlite_url)).trials
    handed = next(t for t in trials if t.number == live.number)
    assert handed.state == TrialState.FAIL and handed.user_attrs["fail_reason"] == "interrupted"
    assert [t.state for t in trials if t.user_attrs.get("retry_of") == live.number] == [
        TrialState.WAITING]
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.parametrize(("objective", "cause"), [
    ("objectives:broken", "KeyError: 'learning_rate'"),
    ("objectives:wrong_metric", "the objective reported ['loss'] but the study's metric is "
                                "'val_loss'"),
])
def test_a_failed_launch_names_the_first_real_cause(
        sqlite_url: str, study_name: str, write_spec, objective: str, cause: str) -> None:
    spec = sleepy_spec(study_name, n_trials=2, objective={"function": objective})
    result = _launch(write_spec(spec), sqlite_url, "--workers", "1")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: workers stopped with 0 of 2 trials finished: "), last
    assert cause in last and "logs in" in last


def test_a_gpu_this_machine_lacks_is_refused_up_front(
        sqlite_url: str, study_name: str, write_spec) -> None:
    spec_path = write_spec(sleepy_spec(study_name))
    result = subprocess.run(
        [sys.executable, "-m", "search", "launch", str(spec_path), "--storage", sqlite_url,
         "--gpus", "0", "--no-progress"], capture_output=True, text=True, timeout=120,
        env=cli_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --gpus 0: this machine has no GPU 0 (GPUs visible here: none; from "
        "CUDA_VISIBLE_DEVICES, else nvidia-smi)"]
    assert optuna.get_all_study_summaries(open_storage(sqlite_url)) == []


def test_workers_are_recycled_after_recycle_after_trials(
        sqlite_url: str, study_name: str, write_spec) -> None:
    spec = sleepy_spec(study_name, n_trials=3, epochs=1,
                       workers={"heartbeat_interval": 1, "grace_period": 4, "recycle_after": 1})
    process, stderr = _popen_launch(write_spec(spec), sqlite_url, "--workers", "1",
                                    SEARCH_TEST_EPOCH_SECONDS="0.1")
    assert process.wait(timeout=240) == 0, stderr.read_text()[-3000:]
    study = assert_exact_budget(sqlite_url, study_name, 3)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 3, "a fresh process per trial"
    assert stderr.read_text().count("asked to be replaced") >= 2
    assert "crashed" not in stderr.read_text()
