"""Adapt a training function to an Optuna trial: `report(step, metrics)` -> report/prune/stop.

The training function (built-in or the user's) has the contract
`train(params, device, report, [checkpoint=..., epochs=...])`. The `Reporter` given as
`report` records each epoch on the trial, asks the pruner, applies early stopping and notices
preemption, ending training by raising `optuna.TrialPruned` or a `search.exceptions.StopTrial`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import optuna

from search.exceptions import EarlyStopped, ObjectiveError, Preempted, TrialLost
from search.spec import StudySpec, import_objective

logger = logging.getLogger(__name__)

HISTORY_ATTR = "epoch_metrics"
GUARDED_METRICS = ("train_loss", "grad_norm")
#: The Optuna constraint set to 1.0 (violated) on diverged or out-of-memory trials.
CONSTRAINT = "diverged"


class Reporter:
    """The `report` callable handed to a training function for one trial."""

    def __init__(
        self,
        trial: optuna.Trial,
        spec: StudySpec,
        *,
        stop_event: threading.Event | None = None,
        history: list[dict[str, float]] | None = None,
    ) -> None:
        self.trial = trial
        self.metric = spec.metric
        self.maximize = spec.direction == "maximize"
        self.patience = spec.early_stopping.patience
        self.min_delta = spec.early_stopping.min_delta
        self.stop_event = stop_event or threading.Event()
        self.history: list[dict[str, float]] = list(history or [])
        self.best: float | None = None
        self.best_epoch = 0
        for row in self.history:
            self._track_best(int(row["epoch"]), float(row.get(self.metric, math.nan)))

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise ObjectiveError(
                f"the objective reported {sorted(metrics)} but the study's metric is "
                f"{self.metric!r}"
            )
        value = float(metrics[self.metric])
        row = {"epoch": step, **{k: float(v) for k, v in metrics.items()}}
        try:
            self.trial.report(value, step)
            self.history.append(row)
            self.trial.set_user_attr(HISTORY_ATTR, self.history)
        except optuna.exceptions.UpdateFinishedTrialError as e:
            raise TrialLost(f"trial {self.trial.number} was finished by another process") from e
        if self.stop_event.is_set():
            raise Preempted(f"stop requested after epoch {step}")
        self._prune_if_needed(step, value, row)
        self._track_best(step, value)
        if self.patience is not None and step - self.best_epoch >= self.patience:
            raise EarlyStopped(
                f"{self.metric} has not improved by more than {self.min_delta:g} for "
                f"{self.patience} epochs (best {self.best:.4g} at epoch {self.best_epoch})"
            )

    def _prune_if_needed(self, step: int, value: float, row: dict[str, float]) -> None:
        try:
            prune = self.trial.should_prune()
        except optuna.exceptions.UpdateFinishedTrialError as e:
            raise TrialLost(f"trial {self.trial.number} was finished by another process") from e
        if not prune:
            bad = [
                k
                for k in (self.metric, *GUARDED_METRICS)
                if k in row and not math.isfinite(row[k])
            ]
            if not bad:
                return
            # The study's pruner kept a non-finite trial: its weights are gone, so stop anyway.
            reason = f"{bad[0]} is {row[bad[0]]} at epoch {step}"
            record_prune(
                self.trial.study._storage,
                self.trial._trial_id,
                "non-finite",
                reason,
                infeasible=True,
                constrain=CONSTRAINT not in self.trial.constraints,
            )
            raise optuna.TrialPruned(reason)
        # The pruner may have stored its own rule and reason; read them as stored.
        trial = self.trial
        stored = trial.study._storage.get_trial_user_attrs(trial._trial_id)
        if "prune_rule" in stored:
            raise optuna.TrialPruned(stored.get("prune_reason", "pruned"))
        reason = (
            f"{self.metric} {value:.4g} at epoch {step} pruned by "
            f"{type(trial.study.pruner).__name__}"
        )
        record_prune(
            trial.study._storage,
            trial._trial_id,
            "comparative",
            reason,
            infeasible=False,
            constrain=False,
        )
        raise optuna.TrialPruned(reason)

    def _track_best(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            return
        improved = self.best is None or (
            value > self.best + self.min_delta
            if self.maximize
            else value < self.best - self.min_delta
        )
        if improved:
            self.best, self.best_epoch = value, step


def record_prune(
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    rule: str,
    reason: str,
    *,
    infeasible: bool,
    constrain: bool,
) -> dict[str, Any]:
    """Store why a trial is pruned (the one format the worker and the pruners share).

    Args:
        constrain: also set the Optuna constraint `diverged` = 1.0 (violated); the caller
            decides, since it knows whether the constraint is set already.

    Returns:
        The user attributes written: `prune_rule`, `prune_reason`, `infeasible`.
    """
    attrs = {"prune_rule": rule, "prune_reason": reason, "infeasible": infeasible}
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    if constrain:
        storage.set_trial_system_attr(trial_id, f"constraints:{CONSTRAINT}", 1.0)
    return attrs


def build_training_function(spec: StudySpec) -> Callable[..., Any]:
    """The callable to run for each trial: the built-in trainer or the spec's function."""
    if spec.objective.function is None:
        from search import trainable

        return functools.partial(
            trainable.train,
            dataset=spec.objective.dataset,
            epochs=spec.epochs,
            seed=spec.seed or 0,
        )
    function = import_objective(spec.objective.function)
    accepted = inspect.signature(function).parameters
    if "epochs" in accepted:
        function = functools.partial(function, epochs=spec.epochs)
    return function


def call_training(
    function: Callable[..., Any],
    params: dict[str, Any],
    device: str,
    report: Reporter,
    **extras: Any,
) -> Any:
    """Call `function`, passing only the optional keywords (`checkpoint`, ...) it accepts."""
    target = function.func if isinstance(function, functools.partial) else function
    accepted = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in extras.items() if v is not None and (takes_any or k in accepted)}
    return function(params, device, report, **kwargs)
