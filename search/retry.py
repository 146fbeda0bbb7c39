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
