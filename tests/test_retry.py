"""Retries (search/retry.py): the template, the retry bound and replaying a chain's curve."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search.record import Outcome
from search.retry import fail_and_requeue, replay_chain, retry_root, retry_template
from search.storage import open_storage


def _failed(**system_attrs: object) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(state=TrialState.FAIL, params={"x": 0.5},
                                      distributions={"x": FloatDistribution(0, 1)},
                                      user_attrs={"effective_lr": 0.1, "worker": "w"},
                                      system_attrs=system_attrs)
    trial.number = 4
    return trial


def test_a_retry_keeps_params_and_derived_attrs_and_records_its_chain() -> None:
    retry = retry_template(_failed(), reason="preempted", counts_retry=False, max_retries=0)
    assert retry is not None and retry.state == TrialState.WAITING
    assert retry.params == {"x": 0.5}
    assert retry.user_attrs == {"effective_lr": 0.1, "retry_of": 4, "retry_reason": "preempted"}
    assert retry.system_attrs == {"failed_trial": 4, "retry_history": [4], "crash_retries": 0}
    assert retry_root(retry) == 4


def test_crash_retries_stop_at_max_retries_and_preemptions_do_not_count() -> None:
    once = _failed(crash_retries=1, failed_trial=2, retry_history=[2])
    assert retry_template(once, reason="x", counts_retry=True, max_retries=1) is None
    assert retry_template(once, reason="x", counts_retry=False, max_retries=1) is not None


def test_fail_and_requeue_follows_the_table(sqlite_url: str) -> None:
    study = optuna.create_study(storage=open_storage(sqlite_url))
    for outcome, queued in ((Outcome.PREEMPTED, True), (Outcome.OBJECTIVE_ERROR, False)):
        trial = study.ask({"x": FloatDistribution(0, 1)})
        assert fail_and_requeue(study._storage, study._study_id, trial._trial_id, outcome,
                                max_retries=1, detail="why")
        stored = study._storage.get_trial(trial._trial_id)
        assert stored.user_attrs["fail_reason"] == f"{outcome.value}: why"
        waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
        assert bool(waiting) == queued
        for w in waiting:
            study._storage.set_trial_state_values(w._trial_id, TrialState.FAIL)


def test_a_retry_replays_its_chains_curve_up_to_the_checkpoint(sqlite_url: str) -> None:
    study = optuna.create_study(storage=open_storage(sqlite_url))
    first = study.ask({"x": FloatDistribution(0, 1)})
    for step in (1, 2, 3):
        first.report(1.0 / step, step)
    first.set_user_attr("epoch_metrics", [{"epoch": s, "val_loss": 1.0 / s, "lr": 0.1}
                                          for s in (1, 2)])
    fail_and_requeue(study._storage, study._study_id, first._trial_id, Outcome.PREEMPTED,
                     max_retries=1)
    retry = study.ask()
    rows = replay_chain(retry, metric="val_loss", upto_epoch=2)
    assert rows == [{"epoch": 1, "val_loss": 1.0, "lr": 0.1}, {"epoch": 2, "val_loss": 0.5,
                                                               "lr": 0.1}]
    assert retry.user_attrs["resumed_from_epoch"] == 2
    assert study._storage.get_trial(retry._trial_id).intermediate_values == {1: 1.0, 2: 0.5}
