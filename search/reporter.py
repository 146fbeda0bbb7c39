"""The `report(step, metrics)` callable a training function gets for one trial.

Each call is one database transaction (the objective's intermediate value and the epoch's
metrics row, see `search.epochs`), then a pruning decision made in memory: the trial's own
curve is held here, and the comparison with peers reads a `Peers` view: other workers'
trials are read at most every `PEER_STALENESS` seconds, the worker's own as each finishes
(one row), so a lone worker always compares with every trial before it. Nothing read per
epoch grows with the epochs, the trials or the workers of the study. Training ends by
`report` raising `optuna.TrialPruned` or a `search.exceptions.StopTrial`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from search import optuna_compat
from search.curves import Curve, Verdict
from search.epochs import record_epoch
from search.exceptions import EarlyStopped, ObjectiveError, Preempted, TrialLost
from search.record import CONSTRAINT, CONSTRAINT_KEY, prune_attrs
from search.spec import StudySpec
from search.trend import Peers, TrendPruner

logger = logging.getLogger(__name__)

GUARDED_METRICS = ("train_loss", "grad_norm")
#: The comparison with other workers' trials may be this many seconds behind the study.
PEER_STALENESS = 10.0


class PeerFeed:
    """The study's finished trials as a `Peers` view, refreshed incrementally when stale."""

    def __init__(self, study: optuna.Study, *, staleness: float = PEER_STALENESS) -> None:
        self.study = study
        self.staleness = staleness
        self.peers = Peers(study.direction)
        self._read_at = -math.inf

    def current(self) -> Peers:
        now = time.monotonic()
        if now - self._read_at >= self.staleness:
            states = (TrialState.COMPLETE, TrialState.PRUNED)
            self.peers.add(self.study.get_trials(deepcopy=False, states=states))
            self._read_at = now
        return self.peers

    def add_own(self, trial_id: int) -> None:
        """Count a trial this worker has just finished, at once (one row read, not the study)."""
        self.peers.add([optuna_compat.storage_of(self.study).get_trial(trial_id)])


class Reporter:
    """Record each epoch on the trial, ask the pruner, apply early stopping, notice stops."""

    def __init__(
        self,
        trial: optuna.Trial,
        spec: StudySpec,
        *,
        params: dict[str, Any] | None = None,
        peers: PeerFeed | None = None,
        stop_event: threading.Event | None = None,
        history: list[dict[str, float]] | None = None,
        best_checkpoint: Any = None,
    ) -> None:
        self.trial = trial
        self.storage = optuna_compat.storage_of(trial.study)
        self.trial_id = optuna_compat.trial_id(trial)
        self.rdb = optuna_compat.is_rdb(self.storage)
        self.metric = spec.metric
        self.direction = trial.study.direction
        self.maximize = spec.direction == "maximize"
        self.params = dict(params or trial.params)
        self.patience = spec.early_stopping.patience
        self.min_delta = spec.early_stopping.min_delta
        self.pruner = trial.study.pruner
        self.peers = peers
        self.stop_event = stop_event or threading.Event()
        self.history: list[dict[str, float]] = list(history or [])
        self.best: float | None = None
        self.best_epoch = 0
        self.last_report = time.monotonic()
        self.best_checkpoint = best_checkpoint  # its `mark_best()` keeps the best epoch's file
        for row in self.history:
            self._track_best(int(row["epoch"]), float(row.get(self.metric, math.nan)))

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        if self.metric not in metrics:
            raise ObjectiveError(
                f"the objective reported {sorted(metrics)} but the study's metric is "
                f"{self.metric!r}"
            )
        row = {"epoch": int(step), **{k: _number(k, v) for k, v in metrics.items()}}
        value = row[self.metric]
        try:
            if self.rdb:
                record_epoch(self.storage, self.trial_id, int(step), value, row)
                optuna_compat.note_intermediate(self.trial, int(step), value)
            else:  # an in-memory study (a notebook, a test): Optuna's own report
                self.trial.report(value, int(step))
        except optuna.exceptions.UpdateFinishedTrialError as e:
            raise TrialLost(f"trial {self.trial.number} was finished by another process") from e
        self.history.append(row)
        self.last_report = time.monotonic()
        if self.stop_event.is_set():
            raise Preempted(f"stop requested after epoch {step}")
        self._prune_if_needed(int(step), value, row)
        if self._track_best(int(step), value) and self.best_checkpoint is not None:
            self.best_checkpoint.mark_best()  # the file holds this epoch: the trainer saved it
        if self.patience is not None and step - self.best_epoch >= self.patience:
            raise EarlyStopped(
                f"{self.metric} has not improved by more than {self.min_delta:g} for "
                f"{self.patience} epochs (best {self.best:.4g} at epoch {self.best_epoch})"
            )

    def _prune_if_needed(self, step: int, value: float, row: dict[str, float]) -> None:
        judge = getattr(self.pruner, "judge", None)
        if judge is not None:
            curve = Curve.from_rows(
                self.history, metric=self.metric, direction=self.direction, params=self.params
            )
            verdict = judge(curve, self.peers.current() if self.peers else None)
            if verdict is None:
                verdict = self._ask_wrapped(step, value)
            if verdict is None:
                return
            self._record(verdict.rule, verdict.reason, infeasible=verdict.infeasible)
            if getattr(verdict, "end", False):
                self._track_best(step, value)
                raise EarlyStopped(verdict.reason, rule=verdict.rule)
            raise optuna.TrialPruned(verdict.reason)
        try:
            prune = self.trial.should_prune()
        except optuna.exceptions.UpdateFinishedTrialError as e:
            raise TrialLost(f"trial {self.trial.number} was finished by another process") from e
        bad = [
            k for k in (self.metric, *GUARDED_METRICS) if k in row and not math.isfinite(row[k])
        ]
        if not prune and not bad:
            return
        if not prune:  # the study's pruner kept a non-finite trial: its weights are gone
            reason = f"{bad[0]} is {row[bad[0]]} at epoch {step}"
            self._record("non-finite", reason, infeasible=True)
            raise optuna.TrialPruned(reason)
        reason = (
            f"{self.metric} {value:.4g} at epoch {step} pruned by {type(self.pruner).__name__}"
        )
        self._record("comparative", reason, infeasible=False)
        raise optuna.TrialPruned(reason)

    def _ask_wrapped(self, step: int, value: float) -> Verdict | None:
        """A `DivergencePruner` wrapping one of Optuna's pruners (`comparative: median`): that
        pruner needs the study, so it is asked here, as `Trial.should_prune` would."""
        inner = getattr(self.pruner, "comparative", None)
        if inner is None or isinstance(inner, TrendPruner):
            return None
        latest = optuna_compat.latest_trial(self.trial)
        try:
            if not inner.prune(self.trial.study, latest):
                return None
        except optuna.exceptions.UpdateFinishedTrialError as e:
            raise TrialLost(f"trial {self.trial.number} was finished by another process") from e
        reason = f"{self.metric} {value:.4g} at epoch {step} pruned by {type(inner).__name__}"
        return Verdict("comparative", reason, False)

    def _record(self, rule: str, reason: str, *, infeasible: bool) -> None:
        for key, value in prune_attrs(rule, reason, infeasible=infeasible).items():
            self.trial.set_user_attr(key, value)  # the live trial sees it at once too
        if infeasible and CONSTRAINT not in self.trial.constraints:
            self.storage.set_trial_system_attr(self.trial_id, CONSTRAINT_KEY, 1.0)

    def _track_best(self, step: int, value: float) -> bool:
        if not math.isfinite(value):
            return False
        improved = self.best is None or (
            value > self.best + self.min_delta
            if self.maximize
            else value < self.best - self.min_delta
        )
        if improved:
            self.best, self.best_epoch = value, step
        return improved


def _number(key: str, value: Any) -> float:
    """A reported metric as a float (a 0-d torch tensor or numpy scalar is accepted)."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ObjectiveError(
            f"the objective reported {key}={value!r:.60}, which is not a number"
        ) from e
