"""The comparative part of pruning: behind its peers now, and not improving fast enough.

`TrendPruner` judges a trial against the finished trials' running bests at the same step,
but first projects the trial's own recent trend, so slow starters that are still improving
fast are not cut at the end of warm-up.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.curves import Curve, Verdict, check_ranges
from search.optuna_compat import storage_of

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: `TrendPruner`'s default warm-up: no comparison before this step ...
WARMUP_STEPS = 5
#: ... or before a fifth of the trials' length when that is shorter, but never before this
SHORTEST_WARMUP = 2


class Peers:
    """The finished trials a decision compares with, read once each, flipped so lower is
    better: per step, the sorted running bests of every finished trial that got there.

    Build it once per study with `Peers(direction)` and feed it with `add` the finished
    (COMPLETE or PRUNED) trials it has not been given yet; a trial given twice is counted
    once. It holds no storage handle: the caller decides how stale it may be.

    Attributes:
        finished: trials added; complete: those COMPLETE.
        horizon: the last step any complete trial reached.
        by_step: step -> sorted running bests of the trials that reached it.
        finals: sorted best values of the complete trials.
        bests: sorted best values of every finished trial (a pruned one: its best before it
            was stopped).
        floor: the lowest flipped value seen (< 0: the metric is not a positive loss).
    """

    def __init__(self, direction: StudyDirection) -> None:
        self.sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
        self.seen: set[int] = set()
        self.by_step: dict[int, list[float]] = {}
        self.finals: list[float] = []
        self.bests: list[float] = []
        self.finished = 0
        self.complete = 0
        self.horizon = 0
        self.floor = math.inf

    def add(self, trials: Iterable[FrozenTrial]) -> None:
        """Count finished trials not seen before (others are ignored)."""
        touched: set[int] = set()
        for trial in trials:
            if trial.number in self.seen or trial.state not in FINISHED:
                continue
            self.seen.add(trial.number)
            self.finished += 1
            best = math.inf
            for step in sorted(trial.intermediate_values):
                value = self.sign * trial.intermediate_values[step]
                if math.isfinite(value):
                    best = min(best, value)
                    self.floor = min(self.floor, value)
                if math.isfinite(best):
                    self.by_step.setdefault(step, []).append(best)
                    touched.add(step)
            if math.isfinite(best):
                bisect.insort(self.bests, best)
            if trial.state == TrialState.COMPLETE:
                self.complete += 1
                self.horizon = max(self.horizon, trial.last_step or 0)
                value = best if math.isfinite(best) else self.sign * (trial.value or math.nan)
                if math.isfinite(value):
                    bisect.insort(self.finals, value)
        for step in touched:
            self.by_step[step].sort()

    def population(self, step: int, percentile: float) -> float:
        """The `percentile` of all finished trials at `step`; one stopped before is +inf."""
        rank = max(0, math.ceil(percentile / 100 * self.finished) - 1)
        reached = self.by_step.get(step, [])
        return reached[rank] if rank < len(reached) else math.inf

    def final(self, percentile: float) -> float:
        """The `percentile` of the complete trials' best values (+inf with none)."""
        return _percentile(self.finals, percentile) if self.finals else math.inf

    def rank(self, percentile: float) -> float:
        """The `percentile` of every finished trial's best value, pruned ones included
        (+inf with none): unlike `final`, it does not rise as the weak are pruned."""
        return _percentile(self.bests, percentile) if self.bests else math.inf

    def spread(self) -> float | None:
        """The study's scale: how far a typical trial travels, the median of the first
        step's values minus the median best of the complete trials (None before 5 trials
        reached the first step and one completed, or when that is not > 0)."""
        first = self.by_step.get(min(self.by_step), []) if self.by_step else []
        if len(first) < 5 or not self.finals:
            return None
        size = _percentile(first, 50) - _percentile(self.finals, 50)
        return size if size > 0 else None


class TrendPruner(BasePruner):
    """Prune a trial that is behind its peers now and not improving fast enough to catch up.

    From step `warmup_steps` on (5, or a fifth of the trials' length when that is shorter,
    at least 2; once `n_startup_trials` are complete), a trial whose best value so far is
    worse than the `percentile` of the finished trials at that step is projected `horizon`
    epochs ahead: a line fitted to its last `window` values (in log space for a positive
    loss whose peers never went below 0 either; a metric that crosses zero is projected
    linearly) is extended by its slope x `optimism` and lowered by `noise` x the scatter
    around it. The trial is pruned when even that projection is worse than the
    `target_percentile` of all finished trials at the projected step, where a trial pruned
    before that step counts as worse than every one that got there, so the bar does not rise
    as weak trials are pruned. A slow starter that falls fast projects far and is kept.

    Schedule-aware (`Curve.warmup`: the `warmup_epochs` param or the epochs the reported
    `lr` first rose; `Curve.segment_start`): no comparison during the warm-up, nor at an
    epoch the `lr` rises (a restart), nor, before step `warmup_steps` + warm-up, while the
    trial is above its best (climbing out of a warm-up spike); the trend line is fitted only
    to the current stretch of the schedule, from its highest value when 3 or more follow. A
    trial with a linear warm-up of w epochs is compared with its peers at step `step - w // 2`
    (its warm-up trained at half the learning rate on average).

    No comparison from four fifths of the complete trials' length on (`peers.horizon`; step
    32 of 40, 12 of 15), the mirror of the warm-up: a trial stopped there saves at most a fifth
    of its epochs and loses its result.

    NaN/inf: non-finite values are skipped everywhere (`DivergencePruner`'s `non-finite` rule
    handles them); a trial with no finite value is never pruned here.

    `judge(curve, peers)` is the decision itself, pure: the worker builds the `Curve` from its
    in-memory rows and keeps one `Peers`. `prune(study, trial)` (Optuna's contract) builds
    both from the study: finished trials do not change, so each is read once into sorted
    per-step lists, and the study is re-read only every `max(refresh_every, complete // 50)`
    decisions (`PeerCache`): the cost per decision stays flat as the study grows, where
    Optuna's pruners read every trial on every call.

    Scale: only ranks and differences of values are compared, so multiplying the metric by
    any positive constant gives the same decisions.

    Args:
        percentile: a trial at least this good among its peers at its step is kept (0-100).
        target_percentile: the rank among all finished trials the projection must reach.
        n_startup_trials: complete trials needed before any comparison.
        n_warmup_steps: no comparison before this step; None (the default): 5, or a fifth
            of the trials' length (the last step of the complete trials) when that is
            shorter, but at least 2 (`warmup_steps`): in a 15-epoch study 5 steps would be a
            third of every trial.
        window: epochs the trend line is fitted to (>= 3).
        horizon: epochs projected ahead (capped at the last step of complete trials).
        noise: multiples of the scatter around the line granted to a noisy curve.
        optimism: multiplies the projected slope.
        end_percentile: a trial ahead of its peers from step 2 x `warmup_steps` on whose
            trend, projected to the last step of the complete trials, misses this percentile
            of their bests is ended at its best (`Verdict.end`); None: never.
        refresh_every: `prune` re-reads the study's finished trials at most every this many
            decisions (or every complete trials // 50, if more).
    """

    def __init__(
        self,
        *,
        percentile: float = 50.0,
        target_percentile: float = 10.0,
        n_startup_trials: int = 5,
        n_warmup_steps: int | None = None,
        window: int = 6,
        horizon: int = 15,
        noise: float = 1.0,
        optimism: float = 1.0,
        refresh_every: int = 5,
        end_percentile: float | None = None,
    ) -> None:
        check_ranges(
            percentile=(percentile, 0, 100), target_percentile=(target_percentile, 0, 100)
        )
        check_ranges(n_startup_trials=(n_startup_trials, 0))
        if n_warmup_steps is not None:
            check_ranges(n_warmup_steps=(n_warmup_steps, 0))
        if end_percentile is not None:
            check_ranges(end_percentile=(end_percentile, 0, 100))
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
        self.end_percentile = end_percentile
        self.cache = PeerCache(refresh_every)

    @property
    def earliest_step(self) -> int:
        """The first step any comparison can happen at, whatever the trials' length."""
        return SHORTEST_WARMUP if self.n_warmup_steps is None else self.n_warmup_steps

    def warmup_steps(self, peers: Peers) -> int:
        """Steps before any comparison: `n_warmup_steps`, or by default `WARMUP_STEPS`
        capped at a fifth of the trials' length (`peers.horizon`), at least
        `SHORTEST_WARMUP`."""
        if self.n_warmup_steps is not None:
            return self.n_warmup_steps
        return max(SHORTEST_WARMUP, min(WARMUP_STEPS, peers.horizon // 5))

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.stop(study, trial) is not None

    def stop(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """What `prune` does, with the verdict kept (`decide`: nothing is recorded)."""
        return self.decide(study, trial)

    def decide(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """`judge` on the frozen trial, against the study's finished trials (re-read at most
        every `refresh_every` decisions)."""
        step = trial.last_step
        if step is None or step < self.earliest_step:
            return None
        return self.judge(Curve.of(trial, study.direction), self.cache.get(study))

    def judge(self, curve: Curve, peers: Peers | None) -> Verdict | None:
        """The comparative verdict on `curve` against `peers`, or None to keep the trial.
        Pure: no I/O. `peers` None: no comparison, so None."""
        _, values = curve.finite()
        if peers is None or not values or peers.complete < max(1, self.n_startup_trials):
            return None
        step, warmup, wait = curve.steps[-1], curve.warmup, self.warmup_steps(peers)
        if step < wait or 0 < peers.horizon - peers.horizon // 5 <= step:
            return None  # warming up, or in the peers' last fifth: stopping saves little
        if step < wait + warmup and values[-1] > min(values):
            return None  # rising again after its learning-rate warm-up: not yet judged
        start = curve.segment_start()
        if start > 0 and start == len(curve.steps) - 1:
            return None  # in its warm-up, or the lr rose at this epoch (warm-up end, restart)
        age = max(1, step - warmup // 2)  # a linear warm-up trains at half the lr
        now = peers.by_step.get(age, [])
        if not now:
            return None
        trend = self._trend(curve, start)
        best, median = min(values), _percentile(now, self.percentile)
        if best <= median:
            return self._ends(curve, peers, best, trend, wait)
        target = min(age + self.horizon, max(peers.horizon, age))
        log = curve.positive and peers.floor > 0
        projected = self._project(*trend, best, target - age, log=log)
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

    def _trend(self, curve: Curve, start: int) -> tuple[list[int], list[float]]:
        """The finite values the trend is fitted to: the last `window` of the current
        stretch of the schedule (from entry `start`, `Curve.segment_start`), from the highest
        of them when 3 or more follow it (the curve since it turned down)."""
        steps, values = curve.finite_from(start)
        steps, values = steps[-self.window :], values[-self.window :]
        peak = values.index(max(values)) if values else 0
        if len(values) - peak >= 3:
            return steps[peak:], values[peak:]
        return steps, values

    def _ends(
        self,
        curve: Curve,
        peers: Peers,
        best: float,
        trend: tuple[list[int], list[float]],
        wait: int,
    ) -> Verdict | None:
        """A trial ahead of its peers whose trend, projected to the last step of the
        complete trials, still misses the `end_percentile` of their bests: ended at its best
        (it is good, so nothing is lost; it will not be the winner)."""
        step = curve.steps[-1]
        if self.end_percentile is None or step < 2 * wait:
            return None
        target = max(peers.horizon, step)
        log = curve.positive and peers.floor > 0
        projected = self._project(*trend, best, target - step, log=log)
        bar = peers.final(self.end_percentile)
        if projected <= bar:
            return None
        return Verdict(
            "comparative",
            f"{curve.name} best {curve.shown(best)} at epoch {step} is ahead of its peers but "
            f"its trend reaches only {curve.shown(projected)} by epoch {target}, short of the "
            f"{self.end_percentile:g}th percentile {curve.shown(bar)} of {peers.complete} "
            f"complete trials; ended at its best",
            False,
            end=True,
        )

    def _project(
        self, steps: list[int], values: list[float], best: float, ahead: int, *, log: bool
    ) -> float:
        xs = steps[-self.window :]
        ys = [math.log(max(v, 1e-300)) if log else v for v in values[-self.window :]]
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


class PeerCache:
    """The `Peers` of the study a pruner was last asked about, for `prune(study, trial)`:
    the finished trials are read once each, and the study is re-read only every
    `max(refresh_every, complete trials // 50)` decisions (the peers are at most that many
    decisions, or 2%, stale)."""

    def __init__(self, refresh_every: int = 5) -> None:
        check_ranges(refresh_every=(refresh_every, 1))
        self.refresh_every = refresh_every
        self.peers: Peers | None = None
        self._study: tuple[int, str] = (-1, "")
        self._calls_left = 0

    def cached(self, study: optuna.Study) -> Peers | None:
        """The peers last read for `study`, without reading (None if never read)."""
        return self.peers if self._study == (id(storage_of(study)), study.study_name) else None

    def get(self, study: optuna.Study) -> Peers:
        key = (id(storage_of(study)), study.study_name)
        if self.peers is None or self._study != key:
            self.peers, self._study, self._calls_left = Peers(study.direction), key, 0
        if self._calls_left > 0:
            self._calls_left -= 1
            return self.peers
        trials = study.get_trials(deepcopy=False, states=FINISHED)
        self.peers.add(t for t in trials if t.number not in self.peers.seen)
        self._calls_left = max(self.refresh_every, self.peers.complete // 50) - 1
        return self.peers


def _percentile(ordered: list[float], q: float) -> float:
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
