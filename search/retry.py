"""Retries: a trial lost to a crash or preemption is queued again with the same parameters.

Which outcomes are retried, and which count against `workers.max_retries`, is the table in
`search.record.OUTCOMES`. A retry is a WAITING trial, queued in the same database transaction
that fails the lost one (`fail_and_requeue`), so no crash can lose the trial or queue it
twice, and its budget slot is never free for a new trial in between. The retry carries
Optuna's `failed_trial` / `retry_history` system attributes (as Optuna's
`RetryHeartbeatStaleTrialCallback` writes them); its root number keys the checkpoint it
resumes from.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import optuna_compat, record
from search.record import Outcome, consequence
from search.transient import retry_transient

logger = logging.getLogger(__name__)

CARRIED_USER_ATTRS = (record.BASE_LR, record.EFFECTIVE_LR)


def retry_root(trial: optuna.trial.BaseTrial | FrozenTrial) -> int:
    """The number of the first trial in this trial's retry chain (itself if not a retry)."""
    root = optuna_compat.trial_system_attrs(trial).get(record.FAILED_TRIAL)
    return int(root) if root is not None else int(trial.number)


def retry_template(
    failed: FrozenTrial, *, reason: str, counts_retry: bool, max_retries: int | None
) -> FrozenTrial | None:
    """The WAITING copy of `failed` to queue, or None when its chain used its retries."""
    crashes = int(failed.system_attrs.get(record.CRASH_RETRIES, 0)) + int(counts_retry)
    if counts_retry and max_retries is not None and crashes > max_retries:
        logger.warning(
            "Trial %d is not retried: it already used its %d retries.", failed.number, max_retries
        )
        return None
    history = [*failed.system_attrs.get(record.RETRY_HISTORY, []), failed.number]
    user_attrs = {k: failed.user_attrs[k] for k in CARRIED_USER_ATTRS if k in failed.user_attrs}
    user_attrs.update({record.RETRY_OF: failed.number, record.RETRY_REASON: reason})
    return optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=failed.params,
        distributions=failed.distributions,
        user_attrs=user_attrs,
        system_attrs={
            record.FAILED_TRIAL: retry_root(failed),
            record.RETRY_HISTORY: history,
            record.CRASH_RETRIES: crashes,
        },
    )


@retry_transient
def fail_and_requeue(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    trial_id: int,
    outcome: Outcome,
    *,
    max_retries: int | None,
    detail: str | None = None,
    attrs: dict[str, Any] | None = None,
    retried: bool | None = None,
) -> bool:
    """Fail a RUNNING trial for `outcome` and queue its retry if the outcome table says so,
    in one transaction (it takes the study's row lock itself).

    Args:
        detail: appended to the stored `fail_reason` (`"error: KeyError: 'lr'"`).
        attrs: more user attributes to store on the failed trial (its `epoch_metrics`, ...).
        retried: overrides the table's choice (an out-of-memory config retried with gradient
            accumulation).

    Returns:
        False if the trial was no longer RUNNING (someone else finished it): nothing done.
    """
    rule = consequence(outcome)
    failed = storage.get_trial(trial_id)
    if failed.state != TrialState.RUNNING:
        return False
    template = None
    if rule.retried if retried is None else retried:
        template = retry_template(
            failed, reason=outcome.value, counts_retry=rule.counts_retry, max_retries=max_retries
        )
    reason = outcome.value if detail is None else f"{outcome.value}: {detail}"
    stored = {**(attrs or {}), record.FAIL_REASON: reason[:500], record.OUTCOME: outcome.value}
    done = optuna_compat.fail_and_replace(
        storage, study_id, trial_id, attrs=stored, retry=template
    )
    if done and template is not None:
        logger.info(
            "Trial %d (%s) queued for retry with the same parameters.", failed.number, reason
        )
    return done


def replay_chain(trial: optuna.Trial, *, metric: str, upto_epoch: int) -> list[dict[str, Any]]:
    """Report the retry chain's curve up to `upto_epoch` (the checkpoint) onto `trial`.

    The metric comes from each attempt's intermediate values (written first), the other
    metrics from its `epoch_metrics`; a later attempt's epoch wins over an earlier one. Epochs
    the checkpoint covers but no attempt recorded are listed in `missing_epochs`.

    Returns:
        The replayed per-epoch rows, oldest first.
    """
    rows: dict[int, dict[str, Any]] = {}
    history = optuna_compat.trial_system_attrs(trial).get(record.RETRY_HISTORY) or []
    for number in history:
        attempt = optuna_compat.trial_of_number(trial.study, number)
        for step, value in attempt.intermediate_values.items():
            rows[step] = {"epoch": step, metric: value}
        for row in record.epoch_rows(attempt):
            rows[int(row["epoch"])] = {**rows.get(int(row["epoch"]), {}), **row}
    replay = [rows[e] for e in sorted(rows) if e <= upto_epoch]
    for row in replay:
        trial.report(float(row[metric]), int(row["epoch"]))
    missing = [e for e in range(1, upto_epoch + 1) if e not in rows]
    if missing:
        trial.set_user_attr(record.MISSING_EPOCHS, missing)
    trial.set_user_attr(record.RESUMED_FROM_EPOCH, upto_epoch)
    return replay


def resume_history(
    trial: optuna.Trial, root: int, checkpoint: Any, *, metric: str
) -> list[dict[str, Any]]:
    """A retry with its chain's checkpoint gets the chain's curve up to the checkpoint's epoch
    (see `replay_chain`); a first attempt, or one without a checkpoint, starts empty."""
    if checkpoint is None or root == trial.number:
        return []
    state = checkpoint.load()
    done = int(state["epoch"]) if state and "epoch" in state else 0
    logger.info("Trial %d retries trial %d from epoch %d.", trial.number, root, done)
    return replay_chain(trial, metric=metric, upto_epoch=done)
