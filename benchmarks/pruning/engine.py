"""The replay both pruning benchmarks share: curves through a pruner, one study per pool.

A `Run` is one recorded curve (per-epoch rows and the trial's params). `replay` plays the runs
of one study in an order through a pruner and returns how each ended:

* `search` pruners (`DivergencePruner`, `TrendPruner`) are asked exactly as the worker's
  Reporter asks them: each epoch `judge(Curve.from_rows(rows, metric=..., direction=...,
  params=...), peers)`, with one `Peers` fed every finished trial (no staleness). A verdict
  with `end=True` records the trial COMPLETE with its best value so far ("end, don't lose"),
  any other PRUNED.
* Optuna pruners go through a real in-memory Optuna study: `trial.report`, `should_prune`.

A trial never stopped completes with its best finite value (the worker's trial value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from search.curves import Curve
from search.trend import FINISHED, Peers


@dataclass(frozen=True)
class Run:
    rows: list[dict[str, float]]
    params: dict[str, Any]

    def values(self, metric: str) -> np.ndarray:
        return np.array([r.get(metric, math.nan) for r in self.rows], dtype=float)


@dataclass(frozen=True)
class Stop:
    epochs: int  # epochs run
    state: str  # "complete", "ended", "pruned"
    value: float  # the recorded value (NaN when pruned)
    rule: str = ""


class TopKAfterOneEpoch(optuna.pruners.BasePruner):
    """The "1-epoch" baseline (Egele et al. 2023): after epoch 1, keep a trial only if its
    first value is among the best `fraction` of the first values seen so far (after
    `n_startup_trials`); never prune later."""

    def __init__(self, fraction: float = 0.2, n_startup_trials: int = 5) -> None:
        self.fraction, self.n_startup_trials = fraction, n_startup_trials

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if trial.last_step != 1:
            return False
        firsts = [
            t.intermediate_values[1]
            for t in study.get_trials(deepcopy=False, states=FINISHED)
            if 1 in t.intermediate_values and math.isfinite(t.intermediate_values[1])
        ]
        if len(firsts) < self.n_startup_trials:
            return False
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        ranked = sorted(sign * v for v in firsts)
        bar = ranked[max(0, math.ceil(self.fraction * len(ranked)) - 1)]
        value = sign * trial.intermediate_values[1]
        return not value <= bar


def replay(
    runs: Sequence[Run],
    make: Callable[[], Any],
    order: np.ndarray,
    *,
    metric: str,
    direction: StudyDirection,
    keys: Sequence[str],
    with_params: bool,
    name: str = "replay",
) -> list[Stop]:
    """Play `runs` in `order` through a fresh pruner from `make`; the stop of each run (by
    index). `keys`: the row keys reported besides the metric (the reporting mode)."""
    pruner = make()
    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    judge = getattr(pruner, "judge", None)
    study = optuna.create_study(  # a fixed name: Hyperband's brackets hash it
        study_name=name,
        direction=direction,
        pruner=optuna.pruners.NopPruner() if judge else pruner,
        sampler=optuna.samplers.RandomSampler(0),
    )
    peers = Peers(direction)
    stops: list[Stop | None] = [None] * len(runs)
    for i in order:
        run = runs[i]
        trial = study.ask()
        rows: list[dict[str, float]] = []
        best, stop = math.inf, None
        for row in run.rows:
            epoch, value = int(row["epoch"]), float(row.get(metric, math.nan))
            trial.report(value, epoch)
            rows.append({"epoch": epoch, metric: value, **{k: row[k] for k in keys if k in row}})
            if math.isfinite(value):
                best = min(best, sign * value)
            if judge is not None:
                params = run.params if with_params else None
                curve = Curve.from_rows(rows, metric=metric, direction=direction, params=params)
                verdict = judge(curve, peers)
                if verdict is not None:
                    kept = verdict.end and math.isfinite(best)
                    stop = Stop(epoch, "ended" if kept else "pruned", sign * best, verdict.rule)
                    break
            elif trial.should_prune():
                stop = Stop(epoch, "pruned", math.nan, "optuna")
                break
        if stop is None:
            stop = Stop(len(run.rows), "complete", sign * best)
        if stop.state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            stop = Stop(stop.epochs, "pruned", math.nan, stop.rule)
        elif math.isfinite(stop.value):
            study.tell(trial, stop.value)
        else:
            study.tell(trial, state=TrialState.FAIL)
        peers.add(study.get_trials(deepcopy=False)[-1:])
        stops[i] = stop
    return [s for s in stops if s is not None]
