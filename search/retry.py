"""Retries: a trial lost to a crash or preemption is queued again with the same parameters.

The queued trial (state WAITING) is taken by the next worker's `ask`. It carries Optuna's
`failed_trial` / `retry_history` system attributes (as `RetryHeartbeatStaleTrialCallback`
writes them), so the retry chain is visible on every trial, and its root number keys the
checkpoint it resumes from. Only crashes count against `max_retries`; preemption does not,
since it says nothing about the configuration.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)

CARRIED_USER_ATTRS = ("base_lr", "effective_lr")


def system_attrs(trial: optuna.Trial | FrozenTrial) -> dict[str, Any]:
    """A trial's system attributes, whether live (`Trial`) or frozen."""
    if isinstance(trial, FrozenTrial):
        return trial.system_attrs
    return trial.study._storage.get_trial_system_attrs(trial._trial_id)


def retry_root(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of the first trial in this trial's retry chain (itself if not a retry)."""
    root = system_attrs(trial).get("failed_trial")
    return int(root) if root is not None else trial.number


def enqueue_retry(
    study: optuna.Study,
    failed: FrozenTrial,
    *,
    reason: str,
    max_retries: int | None = None,
    count_against_limit: bool = True,
) -> bool:
    """Queue a WAITING copy of `failed`; returns False when its retries are used up.

    Call it under `search.budget.study_lock` so no worker claims the freed budget slot first.
    """
    crashes = int(failed.system_attrs.get("crash_retries", 0)) + int(count_against_limit)
    if count_against_limit and max_retries is not None and crashes > max_retries:
        logger.warning(
            "Trial %d is not retried: it already used its %d retries.", failed.number, max_retries
        )
        return False
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    user_attrs = {k: failed.user_attrs[k] for k in CARRIED_USER_ATTRS if k in failed.user_attrs}
    user_attrs.update(retry_of=failed.number, retry_reason=reason)
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs=user_attrs,
            system_attrs={
                "failed_trial": retry_root(failed),
                "retry_history": history,
                "crash_retries": crashes,
            },
        )
    )
    logger.info("Trial %d (%s) queued for retry with the same parameters.", failed.number, reason)
    return True


def fail_and_requeue(
    study: optuna.Study,
    trial_id: int,
    *,
    reason: str,
    max_retries: int | None = None,
    count_against_limit: bool = True,
    fail_reason: str | None = None,
) -> bool:
    """Fail a RUNNING trial and queue its retry, safe against a crash between the two steps.

    The retry is queued first and only if none exists yet, then the trial is failed: a process
    killed in between leaves a RUNNING trial with its retry queued, and whoever reaps it next
    only fails it. Call it under `search.budget.study_lock`. The trial's `fail_reason` is
    `fail_reason` if given, else `reason` (the retry's `retry_reason`).

    Returns:
        False if another process finished the trial first (nothing was done).
    """
    storage = study._storage
    failed = storage.get_trial(trial_id)
    if failed.state.is_finished():
        return False
    if not _has_retry(study, failed.number):
        enqueue_retry(
            study,
            failed,
            reason=reason,
            max_retries=max_retries,
            count_against_limit=count_against_limit,
        )
    try:
        storage.set_trial_user_attr(trial_id, "fail_reason", fail_reason or reason)
        return bool(storage.set_trial_state_values(trial_id, TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _has_retry(study: optuna.Study, number: int) -> bool:
    return any(
        t.user_attrs.get("retry_of") == number
        for t in study.get_trials(deepcopy=False)
        if t.number > number
    )


def replay_chain(trial: optuna.Trial, *, metric: str, upto_epoch: int) -> list[dict[str, Any]]:
    """Report the retry chain's curve up to `upto_epoch` (the checkpoint) onto `trial`.

    The metric comes from each attempt's intermediate values (written first), the other
    metrics from its `epoch_metrics`; a later attempt's epoch wins over an earlier one. Epochs
    the checkpoint covers but no attempt recorded are listed in `missing_epochs`.

    Returns:
        The replayed per-epoch rows, oldest first.
    """
    study, storage = trial.study, trial.study._storage
    rows: dict[int, dict[str, Any]] = {}
    for number in system_attrs(trial).get("retry_history") or []:
        attempt = storage.get_trial(
            storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        )
        for step, value in attempt.intermediate_values.items():
            rows[step] = {"epoch": step, metric: value}
        for row in attempt.user_attrs.get("epoch_metrics", []):
            rows[int(row["epoch"])] = {**rows.get(int(row["epoch"]), {}), **row}
    replay = [rows[e] for e in sorted(rows) if e <= upto_epoch]
    for row in replay:
        trial.report(float(row[metric]), int(row["epoch"]))
    if replay:
        trial.set_user_attr("epoch_metrics", replay)
    missing = [e for e in range(1, upto_epoch + 1) if e not in rows]
    if missing:
        trial.set_user_attr("missing_epochs", missing)
    trial.set_user_attr("resumed_from_epoch", upto_epoch)
    return replay
