"""`search resume` and `search.resume`: continue real studies from the database alone.

Real processes: `search launch` killed with SIGKILL (launcher and workers, the whole process
group) on PostgreSQL, then resumed; two resumes at once; each documented exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import assert_exact_budget, cli_env, sleepy_spec, wait_for
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from typer.testing import CliRunner

from search.cli import app
from search.spec import spec_from_dict
from search.storage import open_storage
from search.study import create_or_load_study

pytestmark = pytest.mark.slow


def _search(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=cli_env())


def _resume(name: str, url: str, *args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "search", "resume", name, "--storage", url,
                             "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env=cli_env())


def _states(url: str, name: str) -> Counter[TrialState]:
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:  # not created yet
        return Counter()
    return Counter(t.state for t in study.get_trials(deepcopy=False))


@pytest.mark.postgres
def test_resume_after_kill_9_of_a_whole_launch_ends_at_exactly_the_total(
        pg_url: str, study_name: str, write_spec, tmp_path: Path) -> None:
    spec = write_spec(sleepy_spec(study_name, n_trials=6, epochs=4))
    launch = subprocess.Popen(
        [sys.executable, "-m", "search", "launch", str(spec), "--storage", pg_url,
         "--workers", "2", "--no-progress"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd=tmp_path, env=cli_env(), start_new_session=True)
    try:
        wait_for(lambda: _states(pg_url, study_name)[TrialState.COMPLETE] >= 1
                 and _states(pg_url, study_name)[TrialState.RUNNING] >= 1, 120, "a running trial")
    finally:
        os.killpg(launch.pid, signal.SIGKILL)  # the launcher and both workers, at once
        launch.wait()
    before = {t.number: t for t in optuna.load_study(
        study_name=study_name, storage=open_storage(pg_url)).trials}
    assert any(t.state == TrialState.RUNNING for t in before.values())

    resumed = _resume(study_name, pg_url, "--workers", "2", cwd=tmp_path)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["status"] == "done" and summary["finished"] == 6
    study = assert_exact_budget(pg_url, study_name, 6)
    after = {t.number: t for t in study.trials}
    for number, old in before.items():  # every earlier trial kept; the orphans failed
        expected = TrialState.FAIL if old.state == TrialState.RUNNING else old.state
        assert after[number].state == expected and after[number].params == old.params
    orphans = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    assert set(orphans) <= retried  # each orphan was retried with its parameters


@pytest.mark.postgres
def test_two_resumes_at_once_end_at_exactly_the_total(pg_url: str, study_name: str,
                                                       write_spec, tmp_path: Path) -> None:
    spec = write_spec(sleepy_spec(study_name, n_trials=6, epochs=2))
    assert _search("create", str(spec), "--storage", pg_url, cwd=tmp_path).returncode == 0
    runs = [_resume(study_name, pg_url, "--workers", "1", cwd=tmp_path) for _ in range(2)]
    outputs = [r.communicate(timeout=240) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [e[-2000:] for _, e in outputs]
    assert {json.loads(o)["finished"] for o, _ in outputs} == {6}
    assert_exact_budget(pg_url, study_name, 6)


def test_seeded_resume_repeats_no_parameters_and_a_finished_study_is_a_no_op(
        sqlite_url: str, study_name: str, write_spec, tmp_path: Path) -> None:
    spec = write_spec(sleepy_spec(study_name, n_trials=3, epochs=1, seed=7,
                                  sampler={"type": "random"}))
    first = _search("launch", str(spec), "--storage", sqlite_url, "--workers", "1",
                    "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = _search("resume", study_name, "--storage", sqlite_url, "--json", cwd=tmp_path)
    assert again.returncode == 0
    assert json.loads(again.stdout)["status"] == "already-done"
    assert len(assert_exact_budget(sqlite_url, study_name, 3).trials) == 3  # nothing was run

    extended = _search("resume", study_name, "--storage", sqlite_url, "--n-trials", "6",
                       "--workers", "1", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert "done, 6/6 finished" in extended.stdout
    study = assert_exact_budget(sqlite_url, study_name, 6)
    xs = [t.params["x"] for t in study.trials]
    assert len(set(xs)) == len(xs) == 6


def test_resume_from_python_continues_the_study(sqlite_url: str, study_name: str,
                                                write_spec, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import search

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    spec = write_spec(sleepy_spec(study_name, n_trials=2, epochs=1))
    launched = search.launch(spec, sqlite_url, workers=1)
    assert (launched.exit_code, launched.finished) == (0, 2)
    resumed = search.resume(study_name, sqlite_url, n_trials=3, workers=1)
    assert (resumed.status, resumed.exit_code, resumed.finished_before, resumed.finished) == (
        "done", 0, 2, 3)


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "no study 'nosuch'"),
    (["{name}", "--n-trials", "1"], "below the 2 trials"),
])
def test_bad_input_exits_2_with_one_line(sqlite_url: str, study_name: str, args: list[str],
                                          message: str) -> None:
    spec = spec_from_dict(sleepy_spec(study_name), source="test")
    study = create_or_load_study(spec, open_storage(sqlite_url))
    for x in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(
            value=x, params={"x": x}, distributions={"x": FloatDistribution(-1.0, 1.0)}))
    result = CliRunner().invoke(app, ["resume", *(a.format(name=study_name) for a in args),
                                      "--storage", sqlite_url])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and message in line


def test_trials_failing_beyond_the_bound_exit_1(sqlite_url: str, study_name: str,
                                                write_spec, tmp_path: Path) -> None:
    spec = write_spec(sleepy_spec(study_name, n_trials=4, objective={
        "function": "study_factory:broken"}, workers={"heartbeat_interval": 1,
                                                        "grace_period": 4, "max_failures": 2}))
    assert _search("create", str(spec), "--storage", sqlite_url, cwd=tmp_path).returncode == 0
    result = _search("resume", study_name, "--storage", sqlite_url, "--workers", "1", "--json",
                     cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "failed" and summary["finished"] == 0
    assert summary["failed"] >= 2


def test_interrupted_resume_exits_3_and_hands_trials_back(sqlite_url: str, study_name: str,
                                                         write_spec, tmp_path: Path) -> None:
    spec = write_spec(sleepy_spec(study_name, n_trials=4, epochs=20))
    assert _search("create", str(spec), "--storage", sqlite_url, cwd=tmp_path).returncode == 0
    resumed = _resume(study_name, sqlite_url, "--workers", "1", cwd=tmp_path)
    wait_for(lambda: _states(sqlite_url, study_name)[TrialState.RUNNING] == 1, 120, "a trial")
    resumed.send_signal(signal.SIGINT)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 3, err[-2000:]
    assert json.loads(out)["status"] == "interrupted"
    assert _states(sqlite_url, study_name)[TrialState.RUNNING] == 0


def test_resume_on_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    result = CliRunner().invoke(app, ["resume", "x", "--storage", f"sqlite:///{missing}"])
    assert result.exit_code == 2 and result.output.startswith("Error: no SQLite file")
    assert list(tmp_path.iterdir()) == []
