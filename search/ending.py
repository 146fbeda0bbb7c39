"""Ending a trial: the one place that applies the outcome table of `search.record`.

`end_trial` tells Optuna the state the table gives the outcome, stores the trial's per-epoch
metrics and reasons, and for a failure queues the retry the table asks for in the same
transaction (`search.retry.fail_and_requeue`). `check_failures` stops a study whose trials
keep failing for outcomes that count towards `workers.max_failures`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any

import optuna
from optuna.trial import TrialState

from search import config, optuna_compat, record
from search.exceptions import SearchError, TooManyFailures
from search.record import Outcome, consequence
from search.retry import fail_and_requeue

logger = logging.getLogger(__name__)


def end_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    outcome: Outcome,
    *,
    max_retries: int | None,
    history: list[dict[str, Any]] | None = None,
    value: float | None = None,
    detail: str | None = None,
    retried: bool | None = None,
) -> Outcome:
    """End `trial` with `outcome`; returns it, or `Outcome.LOST` if someone else ended it.

    Args:
        history: the per-epoch rows, stored once as `epoch_metrics`.
        value: the value of a COMPLETE trial (its best).
        detail: what went wrong, appended to a failure's `fail_reason`; a prune's reason.
        retried: overrides the table's choice of retrying a failure.
    """
    rule = consequence(outcome)
    if rule.state is None:
        return outcome
    if rule.state == TrialState.FAIL:
        done = fail_and_requeue(
            optuna_compat.storage_of(study),
            optuna_compat.study_id(study),
            optuna_compat.trial_id(trial),
            outcome,
            max_retries=max_retries,
            detail=detail,
            attrs={record.EPOCH_METRICS: history} if history else {},
            retried=retried,
        )
        log = logger.warning if rule.counts_failure else logger.info
        log(
            "Trial %d failed (%s%s).", trial.number, outcome.value, f": {detail}" if detail else ""
        )
        return outcome if done else Outcome.LOST
    if history:
        annotate(trial, record.EPOCH_METRICS, history)
    if outcome is not Outcome.COMPLETE:
        annotate(trial, record.OUTCOME, outcome.value)
    frozen = study.tell(trial, value, state=rule.state, skip_if_finished=True)
    if frozen.state != rule.state:
        logger.warning("Trial %d was already %s.", trial.number, frozen.state.name)
        return Outcome.LOST
    how = f": {detail}" if detail else f" with value {frozen.value:.5g}"
    logger.info("Trial %d %s%s; params %s.", trial.number, outcome.value, how, trial.params)
    return outcome


def annotate(trial: optuna.Trial, key: str, value: Any) -> None:
    """Set a user attribute unless another process finished the trial meanwhile."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr(key, value)


def check_failures(study: optuna.Study, max_failures: int | None) -> None:
    """Raise `TooManyFailures` once `max_failures` (default max(5, budget)) trials failed for
    outcomes that count (objective errors, unusable results, timeouts)."""
    limit = config.max_failures(max_failures, int(study.user_attrs.get(record.BUDGET, 0)))
    failed = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if (o := record.outcome_of(t)) is not None and consequence(o).counts_failure
    ]
    if len(failed) >= limit:
        raise TooManyFailures(
            f"{len(failed)} trials failed with errors (max_failures={limit}); the last: "
            f"{failed[-1].user_attrs.get(record.FAIL_REASON, 'unknown')}"
        )


def check_result(study: optuna.Study) -> None:
    """Raise `SearchError` when the study met its budget without one COMPLETE trial (every
    trial pruned, e.g. an objective that reports NaN every epoch): there is no result."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if not trials or any(t.state == TrialState.COMPLETE for t in trials):
        return
    rules = Counter(str(t.user_attrs.get(record.PRUNE_RULE, "pruned")) for t in trials)
    rule, count = rules.most_common(1)[0]
    example = next(t for t in trials if t.user_attrs.get(record.PRUNE_RULE, "pruned") == rule)
    raise SearchError(
        f"study {study.study_name!r} finished its {len(trials)} trials but no trial completed: "
        f"{count} were pruned by {rule} (trial {example.number}: "
        f"{example.user_attrs.get(record.PRUNE_REASON, 'no reason stored')})"
    )
