"""Ending trials as the outcome table says (search/ending.py): broken objectives, real workers."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, sleepy_spec
from optuna.trial import TrialState

from search.spec import spec_from_dict
from search.storage import open_storage
from search.study import create_or_load_study


def _run(url: str, name: str, tmp_path: Path, function: str, **spec: object
         ) -> tuple[subprocess.CompletedProcess[str], list[optuna.trial.FrozenTrial]]:
    data = sleepy_spec(name, objective={"function": f"objectives:{function}"}, **spec)
    create_or_load_study(spec_from_dict(data), open_storage(url))
    done = subprocess.run(
        [sys.executable, "-m", "search", "worker", name], env=cli_env(url), cwd=tmp_path,
        capture_output=True, text=True, timeout=180)
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    return done, trials


@pytest.mark.slow
@pytest.mark.parametrize("function", ["returns_nan", "returns_none", "returns_vector"])
def test_an_unusable_result_counts_towards_max_failures(
        sqlite_url: str, study_name: str, tmp_path: Path, function: str) -> None:
    done, trials = _run(sqlite_url, study_name, tmp_path, function, n_trials=50,
                        workers={"heartbeat_interval": 1, "grace_period": 4, "max_failures": 3})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Error: 3 trials failed with errors (max_failures=3)" in done.stderr
    assert len(trials) == 3, "the worker stopped instead of looping"
    for trial in trials:
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs["outcome"] == "unusable"
        assert trial.user_attrs["fail_reason"].startswith("unusable: the objective reported no")


@pytest.mark.slow
def test_a_zero_dimensional_tensor_result_is_accepted(
        sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    done, trials = _run(sqlite_url, study_name, tmp_path, "returns_tensor", n_trials=3)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for trial in trials:
        assert trial.value == pytest.approx((trial.params["x"] - 0.3) ** 2, rel=1e-5)


@pytest.mark.slow
def test_a_study_whose_every_trial_reports_nan_ends_with_an_error(
        sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    done, trials = _run(sqlite_url, study_name, tmp_path, "reports_nan", n_trials=3)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: study") and "no trial completed" in last, last
    assert Counter(t.state for t in trials) == {TrialState.PRUNED: 3}
    assert {t.user_attrs["prune_rule"] for t in trials} == {"non-finite"}


@pytest.mark.slow
def test_a_wrong_metric_name_fails_the_trial_and_says_why(
        sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    done, trials = _run(sqlite_url, study_name, tmp_path, "wrong_metric", n_trials=3)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: the objective reported ['loss'] but the study's metric is 'val_loss'")
    assert [t.state for t in trials] == [TrialState.FAIL], "nothing left RUNNING"
    assert trials[0].user_attrs["outcome"] == "error"


@pytest.mark.slow
def test_an_objective_error_is_stored_with_its_type_and_message(
        sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    done, trials = _run(sqlite_url, study_name, tmp_path, "boom", n_trials=20,
                        workers={"heartbeat_interval": 1, "grace_period": 4, "max_failures": 2})
    assert done.returncode == 2
    assert [t.user_attrs["fail_reason"] for t in trials] == ["error: RuntimeError: boom"] * 2
    assert all(t.user_attrs["epoch_metrics"][0]["val_loss"] == 1.0 for t in trials)
