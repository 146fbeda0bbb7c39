"""The comparative part of pruning: behind its peers now, and not improving fast enough.

`TrendPruner` judges a trial against the finished trials' running bests at the same step,
but first projects the trial's own recent trend, so slow starters that are still improving
fast are not cut at the end of warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search import optuna_compat
from search.curves import Curve, Verdict, check_ranges


@dataclass
class Peers:
    """Sorted running bests of the finished trials at each step, built incrementally.

    The caller feeds it finished (COMPLETE or PRUNED) trials with `add`, each once; the
    worker refreshes it at most every few seconds, so its view is slightly stale.
    """

    direction: StudyDirection = StudyDirection.MINIMIZE
    seen: set[int] = field(default_factory=set)
    by_step: dict[int, list[float]] = field(default_factory=dict)
    finished: int = 0
    complete: int = 0
    horizon: int = 0

    def add(self, trials: list[FrozenTrial]) -> None:
        sign = -1.0 if self.direction == StudyDirection.MAXIMIZE else 1.0
        touched: set[int] = set()
        for trial in trials:
            if trial.number in self.seen:
                continue
            self.seen.add(trial.number)
            self.finished += 1
            if trial.state == TrialState.COMPLETE:
                self.complete += 1
                self.horizon = max(self.horizon, trial.last_step or 0)
            best = math.inf
            for step in sorted(trial.intermediate_values):
                value = sign * trial.intermediate_values[step]
                best = min(best, value) if math.isfinite(value) else best
                if math.isfinite(best):
                    self.by_step.setdefault(step, []).append(best)
                    touched.add(step)
        for step in touched:
            self.by_step[step].sort()

    def population(self, step: int, percentile: float) -> float:
        """The `percentile` of all finished trials at `step`; one stopped before is +inf."""
        rank = max(0, math.ceil(percentile / 100 * self.finished) - 1)
        reached = self.by_step.get(step, [])
        return reached[rank] if rank < len(reached) else math.inf


class TrendPruner(BasePruner):
    """Prune a trial that is behind its peers now and not improving fast enough to catch up.

    From step `n_warmup_steps` on (once `n_startup_trials` are complete), a trial whose best
    value so far is worse than the `percentile` of the finished trials at that step is
    projected `horizon` epochs ahead: a line fitted to its last `window` values (in log space
    for a positive loss) is extended by its slope x `optimism` and lowered by `noise` x the
    scatter around it. The trial is pruned when even that projection is worse than the
    `target_percentile` of all finished trials at the projected step, where a trial pruned
    before that step counts as worse than every one that got there, so the bar does not rise
    as weak trials are pruned. A slow starter that falls fast projects far and is kept.

    NaN/inf: non-finite values are skipped everywhere (`DivergencePruner`'s `non-finite` rule
    handles them); a trial with no finite value is never pruned here.

    Cost: finished trials do not change, so each is read once into sorted per-step lists, and
    the study is re-read only after `complete trials // 50` decisions (the peers are at most
    2% stale): the cost per decision stays flat as the study grows, where Optuna's pruners
    read every trial on every call.

    Args:
        percentile: a trial at least this good among its peers at its step is kept (0-100).
        target_percentile: the rank among all finished trials the projection must reach.
        n_startup_trials: complete trials needed before any comparison.
        n_warmup_steps: no comparison before this step.
        window: epochs the trend line is fitted to (>= 3).
        horizon: epochs projected ahead (capped at the last step of complete trials).
        noise: multiples of the scatter around the line granted to a noisy curve.
        optimism: multiplies the projected slope.
    """

    def __init__(
        self,
        *,
        percentile: float = 50.0,
        target_percentile: float = 15.0,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 5,
        window: int = 6,
        horizon: int = 10,
        noise: float = 1.0,
        optimism: float = 1.0,
    ) -> None:
        check_ranges(
            percentile=(percentile, 0, 100), target_percentile=(target_percentile, 0, 100)
        )
        check_ranges(n_startup_trials=(n_startup_trials, 0), n_warmup_steps=(n_warmup_steps, 0))
        check_ranges(
            window=(window, 3), horizon=(horizon, 0), noise=(noise, 0), optimism=(optimism, 0)
        )
        self.percentile = percentile
        self.target_percentile = target_percentile
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps
        self.window = window
        self.horizon = horizon
        self.noise = noise
        self.optimism = optimism
        self._peers, self._study, self._calls_left = Peers(), (-1, ""), 0

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.decide(study, trial) is not None

    def decide(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """The comparative verdict, or None to keep the trial (Optuna's pruner contract)."""
        if trial.last_step is None or trial.last_step < self.n_warmup_steps:
            return None
        return self.judge(Curve.of(trial, study.direction), self._refresh(study))

    def judge(self, curve: Curve, peers: Peers | None) -> Verdict | None:
        """The comparative verdict on an in-memory curve against `peers`; pure, no I/O."""
        steps, values = curve.finite()
        if peers is None or not values or steps[-1] < self.n_warmup_steps:
            return None
        step = steps[-1]
        now = peers.by_step.get(step, [])
        if peers.complete < max(1, self.n_startup_trials) or not now:
            return None
        best, median = min(values), _percentile(now, self.percentile)
        if best <= median:
            return None
        target = min(step + self.horizon, max(peers.horizon, step))
        projected = self._project(steps, values, best, target - step, log=curve.positive)
        reference = peers.population(target, self.target_percentile)
        if projected <= reference:
            return None
        return Verdict(
            "comparative",
            f"{curve.name} best {curve.shown(best)} at epoch {step} is behind the "
            f"{self.percentile:g}th percentile {curve.shown(median)} of {len(now)} peers, and "
            f"its trend reaches only {curve.shown(projected)} by epoch {target}, short of the "
            f"{self.target_percentile:g}th percentile {curve.shown(reference)} of "
            f"{peers.finished} finished trials",
            False,
        )

    def _project(
        self, steps: list[int], values: list[float], best: float, ahead: int, *, log: bool
    ) -> float:
        xs = steps[-self.window :]
        ys = [math.log(max(v, 1e-12)) if log else v for v in values[-self.window :]]
        if len(xs) < 3:
            return best
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        residuals = [y - my - slope * (x - mx) for x, y in zip(xs, ys, strict=True)]
        scatter = math.sqrt(sum(r * r for r in residuals) / (len(xs) - 2))
        drop = min(slope, 0.0) * ahead * self.optimism - self.noise * scatter
        return best * math.exp(drop) if log else best + drop

    def _refresh(self, study: optuna.Study) -> Peers:
        key = (id(optuna_compat.storage_of(study)), study.study_name)
        if self._study != key:
            self._peers, self._study, self._calls_left = Peers(study.direction), key, 0
        if self._calls_left > 0:
            self._calls_left -= 1
            return self._peers
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        self._peers.add(study.get_trials(deepcopy=False, states=states))
        self._calls_left = self._peers.complete // 50
        return self._peers


def _percentile(ordered: list[float], q: float) -> float:
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
