"""Reaping: stale heartbeats, trials that never beat, and crashes between fail and requeue."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
from conftest import assert_exact_budget, sleepy_spec, start_worker, worker_log
from optuna.trial import TrialState

from search.heartbeat import Heartbeat, reap_stale_trials
from search.record import Outcome
from search.retry import fail_and_requeue
from search.spec import spec_from_dict
from search.storage import open_storage
from search.study import create_or_load_study


def _study(url: str, name: str, grace: int = 2) -> tuple[optuna.Study, object]:
    storage = open_storage(url)
    storage.heartbeat_interval, storage.grace_period = 1, grace
    spec = sleepy_spec(name, workers={"heartbeat_interval": 1, "grace_period": grace})
    return create_or_load_study(spec_from_dict(spec), storage), storage


def test_a_beating_trial_is_not_reaped(sqlite_url: str, study_name: str) -> None:
    study, storage = _study(sqlite_url, study_name)
    trial = study.ask()
    beat = Heartbeat(storage, trial._trial_id, 0.5)
    beat.start()
    try:
        time.sleep(2.5)
        assert reap_stale_trials(study, storage, grace_period=2, max_retries=1) == 0
    finally:
        beat.stop()
    assert study.get_trials()[0].state == TrialState.RUNNING


def test_a_trial_that_never_beat_is_reaped_after_the_grace_period(
        sqlite_url: str, study_name: str) -> None:
    study, storage = _study(sqlite_url, study_name)
    study.ask()  # its worker "died" between claiming the trial and its first heartbeat
    assert reap_stale_trials(study, storage, grace_period=2, max_retries=1) == 0
    time.sleep(2.2)
    assert reap_stale_trials(study, storage, grace_period=2, max_retries=1) == 1
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == "heartbeat-stale"
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == first.number


def test_two_reapers_racing_on_one_stale_trial_queue_one_retry(
        pg_url: str, study_name: str) -> None:
    study, storage = _study(pg_url, study_name)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(-1, 1)})
    storage.record_heartbeat(trial._trial_id)
    time.sleep(3.2)  # heartbeats are compared at the database's one-second resolution

    def reap_from_another_process(_: int) -> int:
        own = open_storage(pg_url)  # a connection of its own, as another worker has
        peer = optuna.load_study(study_name=study_name, storage=own)
        return reap_stale_trials(peer, own, grace_period=2, max_retries=1)

    with ThreadPoolExecutor(4) as pool:
        reaped = list(pool.map(reap_from_another_process, range(4)))
    assert sum(reaped) == 1
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]


def test_fail_and_requeue_of_a_finished_trial_does_nothing(
        sqlite_url: str, study_name: str) -> None:
    study, storage = _study(sqlite_url, study_name)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(-1, 1)})
    study.tell(trial, 0.5)
    assert not fail_and_requeue(storage, study._study_id, trial._trial_id,
                                Outcome.HEARTBEAT_LOST, max_retries=1)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_retries_stop_after_max_retries(sqlite_url: str, study_name: str) -> None:
    study, storage = _study(sqlite_url, study_name)
    for _ in range(3):
        trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
    time.sleep(3.2)
    reap_stale_trials(study, storage, grace_period=2, max_retries=0)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * 3


def test_worker_reaps_an_orphan_and_meets_the_budget(pg_url: str, study_name: str,
                                                     tmp_path: Path) -> None:
    study, _ = _study(pg_url, study_name, grace=3)
    study.set_user_attr("n_trials", 3)
    orphan = study.ask()
    worker = start_worker(study_name, pg_url, tmp_path, "w", epoch_seconds=0.2)
    assert worker.wait(timeout=120) == 0, worker_log(tmp_path, "w")[-3000:]
    trials = assert_exact_budget(pg_url, study_name, 3).trials
    assert trials[orphan.number].state == TrialState.FAIL
