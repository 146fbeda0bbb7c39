"""The study and trial record: every attribute key `search` writes, and how a trial can end.

A leaf module (it imports nothing of `search`), so pure code and adapters alike spell the
record one way. Keys live in Optuna's user attributes (shown by optuna-dashboard) unless
marked *system* (Optuna's own retry keys and constraints).

How a trial can end is one table, `OUTCOMES`: for each `Outcome`, the Optuna state it is
told, whether it is retried with the same parameters, whether it counts against the study's
`workers.max_retries` (per retry chain) and `workers.max_failures` (per study), and the
`fail_reason` code stored on it. Every module that ends a trial reads this table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

# --- study user attributes ------------------------------------------------------------------
SPEC = "spec"  #: the resolved study spec (never holds a secret)
BUDGET = "n_trials"  #: finished trials (COMPLETE + PRUNED) to reach
STUDY_UUID = "study_uuid"  #: identity of this study (keys checkpoints), set once at creation
SPEC_CHANGES = "spec_changes"  #: list of {time, field, old, new} applied to a live study

# --- trial user attributes ------------------------------------------------------------------
EPOCH_METRICS = "epoch_metrics"  #: every reported metric per epoch: [{"epoch": 1, ...}, ...]
WORKER = "worker"  #: id of the worker process that ran the trial
HOST = "host"
DEVICE = "device"
PID = "pid"
BASE_LR = "base_lr"
EFFECTIVE_LR = "effective_lr"
PRUNE_RULE = "prune_rule"  #: the rule that stopped the trial (pruned, or ended at its best)
PRUNE_REASON = "prune_reason"  #: a sentence with the numbers that crossed the threshold
INFEASIBLE = "infeasible"  #: the prune says the config diverged (not merely worse)
BEST_EPOCH = "best_epoch"  #: epoch of the best value a COMPLETE trial is recorded with
EARLY_STOPPED = "early_stopped"  #: why a healthy trial was ended before its last epoch
OUTCOME = "outcome"  #: the `Outcome` value of a trial that did not complete normally
FAIL_REASON = "fail_reason"  #: the outcome's code, with details for errors
RETRY_OF = "retry_of"  #: number of the trial this one retries
RETRY_REASON = "retry_reason"
RESUMED_FROM_EPOCH = "resumed_from_epoch"
MISSING_EPOCHS = "missing_epochs"
OOM_CONFIG = "oom_config"
GRAD_ACCUMULATION = "grad_accumulation"
PEAK_GPU_MEMORY_MB = "peak_gpu_memory_mb"
START = "start"  #: on the study's first trial (`sampler.start`): "defaults" or "given"

# --- trial system attributes (Optuna's own retry keys, as its retry callback writes them) -----
FAILED_TRIAL = "failed_trial"  #: number of the first trial of the retry chain
RETRY_HISTORY = "retry_history"  #: numbers of the earlier attempts, oldest first
CRASH_RETRIES = "crash_retries"  #: retries of this chain that count against max_retries
#: The Optuna constraint set to 1.0 (violated) on diverged or out-of-memory trials.
CONSTRAINT = "diverged"
CONSTRAINT_KEY = f"constraints:{CONSTRAINT}"


class Outcome(enum.Enum):
    """Every way a trial can end. The value is stored as the trial's `outcome`."""

    COMPLETE = "complete"
    ENDED = "ended"  # healthy, stopped early at its best (early stopping, end-don't-lose)
    PRUNED = "pruned"
    PREEMPTED = "preempted"  # SIGTERM, a stop request: the worker handed it back
    INTERRUPTED = "interrupted"  # its worker was killed by its launcher on stop
    HEARTBEAT_LOST = "heartbeat-stale"  # its worker died or lost the database
    OUT_OF_MEMORY = "oom"
    OOM_SKIPPED = "oom-skip"  # at least as large as a config that ran out of memory
    OBJECTIVE_ERROR = "error"  # the objective raised
    UNUSABLE_RESULT = "unusable"  # no finite metric reported nor returned
    TIMED_OUT = "timeout"  # an epoch or the trial ran past its timeout
    DISK_FULL = "disk-full"  # the checkpoint could not be written
    LOST = "lost"  # another process finished it first (nothing is written)


@dataclass(frozen=True)
class Consequence:
    """What an outcome means for the trial, its retry chain and the study."""

    state: TrialState | None  # what the trial is told; None: nothing (someone else did)
    retried: bool  # a WAITING copy with the same parameters is queued
    counts_retry: bool  # uses one of the chain's `max_retries`
    counts_failure: bool  # counts towards the study's `max_failures`


_FAIL = TrialState.FAIL
OUTCOMES: dict[Outcome, Consequence] = {
    Outcome.COMPLETE: Consequence(TrialState.COMPLETE, False, False, False),
    Outcome.ENDED: Consequence(TrialState.COMPLETE, False, False, False),
    Outcome.PRUNED: Consequence(TrialState.PRUNED, False, False, False),
    Outcome.PREEMPTED: Consequence(_FAIL, True, False, False),
    Outcome.INTERRUPTED: Consequence(_FAIL, True, False, False),
    Outcome.HEARTBEAT_LOST: Consequence(_FAIL, True, True, False),
    Outcome.OUT_OF_MEMORY: Consequence(_FAIL, False, False, False),
    Outcome.OOM_SKIPPED: Consequence(_FAIL, False, False, False),
    Outcome.OBJECTIVE_ERROR: Consequence(_FAIL, False, False, True),
    Outcome.UNUSABLE_RESULT: Consequence(_FAIL, False, False, True),
    Outcome.TIMED_OUT: Consequence(_FAIL, True, True, True),
    Outcome.DISK_FULL: Consequence(_FAIL, True, False, False),
    Outcome.LOST: Consequence(None, False, False, False),
}


def consequence(outcome: Outcome) -> Consequence:
    return OUTCOMES[outcome]


def outcome_of(trial: FrozenTrial) -> Outcome | None:
    """The stored outcome of a finished trial (older records: read from `fail_reason`)."""
    stored = trial.user_attrs.get(OUTCOME)
    if stored is None and trial.state == TrialState.FAIL:
        stored = str(trial.user_attrs.get(FAIL_REASON, "error")).split(":")[0]
    if stored is None:
        return {TrialState.COMPLETE: Outcome.COMPLETE, TrialState.PRUNED: Outcome.PRUNED}.get(
            trial.state
        )
    try:
        return Outcome(stored)
    except ValueError:
        return Outcome.OBJECTIVE_ERROR


def stop_rule(trial: FrozenTrial) -> str:
    """What stopped a trial early: its `prune_rule`, else "early stopping" for a trial ended
    by the spec's patience, else "pruner" (a pruner that stored no rule)."""
    if PRUNE_RULE in trial.user_attrs:
        return str(trial.user_attrs[PRUNE_RULE])
    return "early stopping" if EARLY_STOPPED in trial.user_attrs else "pruner"


def epoch_rows(trial: FrozenTrial) -> list[dict[str, Any]]:
    """The trial's per-epoch metrics rows, oldest first; the objective's own intermediate
    values fill epochs that have no row (a crash can lose at most the last epoch's row)."""
    rows = {int(r["epoch"]): dict(r) for r in trial.user_attrs.get(EPOCH_METRICS) or []}
    return [rows[e] for e in sorted(rows)]


def prune_attrs(rule: str, reason: str, *, infeasible: bool) -> dict[str, Any]:
    """The user attributes that say why a trial was stopped."""
    return {PRUNE_RULE: rule, PRUNE_REASON: reason, INFEASIBLE: infeasible}


def record_prune(
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    rule: str,
    reason: str,
    *,
    infeasible: bool,
    constrain: bool,
) -> dict[str, Any]:
    """Store why a trial was stopped (the one format the worker and the pruners share).

    Args:
        constrain: also set the Optuna constraint `diverged` = 1.0 (violated); the caller
            decides, since it knows whether the constraint is set already.

    Returns:
        The user attributes written: `prune_rule`, `prune_reason`, `infeasible`.
    """
    attrs = prune_attrs(rule, reason, infeasible=infeasible)
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    if constrain:
        storage.set_trial_system_attr(trial_id, CONSTRAINT_KEY, 1.0)
    return attrs
