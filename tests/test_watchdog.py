"""Time limits on trials and the worker's signals (search/watchdog.py), with real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import cli_env, sleepy_spec
from optuna.trial import TrialState

from search.spec import spec_from_dict
from search.storage import open_storage
from search.study import create_or_load_study
from search.watchdog import EXIT_RECYCLE, Watchdog


@pytest.mark.parametrize(
    ("epoch_timeout", "trial_timeout", "last_report", "now", "expected"),
    [
        (None, None, 0.0, 1e6, None),
        (5.0, None, 8.0, 12.0, None),
        (5.0, None, 8.0, 14.0, "no report for 6 s, past workers.epoch_timeout=5"),
        (None, 10.0, 8.0, 11.0, "it ran 11 s, past workers.trial_timeout=10"),
        (5.0, None, None, 6.0, "no report for 6 s, past workers.epoch_timeout=5"),
    ],
)
def test_a_trial_is_overdue_past_either_limit(
    epoch_timeout: float | None, trial_timeout: float | None, last_report: float | None,
    now: float, expected: str | None,
) -> None:
    watchdog = Watchdog(epoch_timeout, trial_timeout)
    watchdog.reporter = SimpleNamespace(last_report=last_report)
    assert watchdog.overdue(0.0, now) == expected


def test_a_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="epoch_timeout must be > 0, but got epoch_timeout=0"):
        Watchdog(0, None)


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()


def _wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_a_hung_trial_times_out_is_retried_once_and_its_worker_is_recycled(
        pg_url: str, study_name: str, tmp_path: Path) -> None:
    spec = sleepy_spec(study_name, n_trials=3, objective={"function": "objectives:hangs"},
                       workers={"heartbeat_interval": 1, "grace_period": 4, "max_retries": 1,
                                "epoch_timeout": 2})
    create_or_load_study(spec_from_dict(spec), open_storage(pg_url))

    def worker() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "search", "worker", study_name],
                              env=cli_env(pg_url), capture_output=True, text=True, timeout=120)

    first = worker()
    assert first.returncode == EXIT_RECYCLE, first.stderr[-2000:]
    hung, retry = _trials(pg_url, study_name)
    assert hung.state == TrialState.FAIL and hung.user_attrs["outcome"] == "timeout"
    assert "past workers.epoch_timeout=2" in hung.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.params == hung.params
    second = worker()
    assert second.returncode == EXIT_RECYCLE
    states = [t.state for t in _trials(pg_url, study_name)]
    assert states == [TrialState.FAIL, TrialState.FAIL], "a hung config is retried only once"


@pytest.mark.slow
def test_a_second_signal_hands_the_trial_back_at_once(
        sqlite_url: str, study_name: str, tmp_path: Path) -> None:
    create_or_load_study(spec_from_dict(sleepy_spec(study_name, n_trials=2)),
                         open_storage(sqlite_url))
    worker = subprocess.Popen([sys.executable, "-m", "search", "worker", study_name],
                              env=cli_env(sqlite_url, SEARCH_TEST_EPOCH_SECONDS="60"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: any(t.state == TrialState.RUNNING and t.params
                          for t in _trials(sqlite_url, study_name)), 60, "a running trial")
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=30)  # long before the 60 s epoch ends
    assert worker.returncode == 0, out[-2000:]
    handed, retry = _trials(sqlite_url, study_name)
    assert handed.state == TrialState.FAIL and handed.user_attrs["outcome"] == "preempted"
    assert retry.state == TrialState.WAITING and retry.params == handed.params
