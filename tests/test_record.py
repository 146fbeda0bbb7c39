"""The trial record (search/record.py): the outcome table and reading stored trials."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from search.record import OUTCOMES, Outcome, consequence, epoch_rows, outcome_of


def test_every_outcome_has_a_consequence() -> None:
    assert set(OUTCOMES) == set(Outcome)


@pytest.mark.parametrize(
    ("outcome", "retried", "counts_retry", "counts_failure"),
    [
        (Outcome.PREEMPTED, True, False, False),
        (Outcome.INTERRUPTED, True, False, False),
        (Outcome.HEARTBEAT_LOST, True, True, False),
        (Outcome.OUT_OF_MEMORY, False, False, False),
        (Outcome.OBJECTIVE_ERROR, False, False, True),
        (Outcome.UNUSABLE_RESULT, False, False, True),
        (Outcome.TIMED_OUT, True, True, True),
    ],
)
def test_the_table_says_what_each_failure_means(
    outcome: Outcome, retried: bool, counts_retry: bool, counts_failure: bool
) -> None:
    rule = consequence(outcome)
    assert rule.state == TrialState.FAIL
    assert (rule.retried, rule.counts_retry, rule.counts_failure) == (
        retried, counts_retry, counts_failure)




@pytest.mark.parametrize(
    ("state", "user_attrs", "expected"),
    [
        (TrialState.COMPLETE, {}, Outcome.COMPLETE),
        (TrialState.PRUNED, {}, Outcome.PRUNED),
        (TrialState.FAIL, {"outcome": "timeout"}, Outcome.TIMED_OUT),
        (TrialState.FAIL, {"fail_reason": "preempted"}, Outcome.PREEMPTED),  # older records
        (TrialState.FAIL, {"fail_reason": "error: KeyError: 'lr'"}, Outcome.OBJECTIVE_ERROR),
        (TrialState.FAIL, {}, Outcome.OBJECTIVE_ERROR),
    ],
)
def test_the_outcome_of_a_stored_trial(state: TrialState, user_attrs: dict,
                                       expected: Outcome) -> None:
    trial = optuna.trial.create_trial(state=state, value=1.0 if state.name == "COMPLETE" else None,
                                      user_attrs=user_attrs)
    assert outcome_of(trial) == expected


def test_epoch_rows_come_sorted_by_epoch() -> None:
    rows = [{"epoch": 2, "val_loss": 0.5}, {"epoch": 1, "val_loss": 0.9}]
    trial = optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5,
                                      user_attrs={"epoch_metrics": rows})
    assert [r["epoch"] for r in epoch_rows(trial)] == [1, 2]
