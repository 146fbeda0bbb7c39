"""Pruners: divergence rules on a trial's own curve, then a trend-aware comparison with peers.

`DivergencePruner` asks its rules in order and prunes on the first that fires; when none does,
it hands the decision to a wrapped comparative pruner (`TrendPruner` by default, or any Optuna
pruner). Scores are flipped once so that every rule reads "lower is better".

=============  ==============================================================  ==========
rule           fires when                                                      infeasible
=============  ==============================================================  ==========
non-finite     the metric, `train_loss` or `grad_norm` is NaN or +-inf         yes
divergence     the loss fell, then gave back part of its fall for a few epochs  yes
               in a row, or the gradient norm exploded
explosion      the loss is far above its first value (or the untrained loss)   yes
stall          after warm-up the loss has barely moved from its first value     no
comparative    even its own improving trend cannot reach the peers' median      no
=============  ==============================================================  ==========

Every prune stores `prune_rule`, `prune_reason` (a sentence with the numbers) and `infeasible`
in the trial's user attributes; an infeasible trial also gets the Optuna constraint
`constraints:diverged = 1.0`, so TPE learns the region to avoid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.objective import CONSTRAINT, HISTORY_ATTR

logger = logging.getLogger(__name__)

RULES = ("non-finite", "divergence", "explosion", "stall")
GUARDED = ("train_loss", "grad_norm")


@dataclass(frozen=True)
class Verdict:
    """Why a trial is pruned: the rule, a sentence with its numbers, and its feasibility."""

    rule: str
    reason: str
    infeasible: bool


@dataclass(frozen=True)
class Curve:
    """A trial's curve, flipped so that lower is better, with the trainer's extra metrics."""

    name: str
    steps: list[int]
    values: list[float]
    extras: dict[str, list[float]]
    positive: bool

    @classmethod
    def of(cls, trial: FrozenTrial, direction: StudyDirection) -> Curve:
        """Read the curve from the trial alone (intermediate values and `epoch_metrics`)."""
        steps = sorted(trial.intermediate_values)
        raw = [float(trial.intermediate_values[s]) for s in steps]
        sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
        rows = {int(r.get("epoch", -1)): r for r in trial.user_attrs.get(HISTORY_ATTR) or []}
        extras = {k: [float(rows.get(s, {}).get(k, 0.0)) for s in steps] for k in GUARDED}
        last = rows.get(steps[-1], {}) if steps else {}
        name = next((k for k, v in last.items() if k != "epoch" and _same(v, raw[-1])), "value")
        positive = sign > 0 and all(v >= 0 for v in raw if math.isfinite(v))
        return cls(name, steps, [sign * v for v in raw], extras, positive)

    def finite(self) -> tuple[list[int], list[float]]:
        pairs = [(s, v) for s, v in zip(self.steps, self.values, strict=True) if math.isfinite(v)]
        return [s for s, _ in pairs], [v for _, v in pairs]


def non_finite(curve: Curve) -> Verdict | None:
    """NaN or +-inf in the metric, `train_loss` or `grad_norm` at any reported step."""
    for i, step in enumerate(curve.steps):
        for key, value in [(curve.name, curve.values[i])] + [
            (k, v[i]) for k, v in curve.extras.items()
        ]:
            if not math.isfinite(value):
                return Verdict("non-finite", f"{key} is {value} at epoch {step}", True)
    return None


def divergence(curve: Curve, *, margin: float, ratio: float, patience: int) -> Verdict | None:
    """The loss gave back more than `margin` of its fall (and rose `ratio` x above its best
    on a positive loss) for `patience` epochs in a row; NaN and inf entries are skipped."""
    steps, values = curve.finite()
    if len(values) <= patience:
        return None
    first = values[0]
    run = 0
    best = math.inf
    for value in values:
        best = min(best, value)
        fall = first - best
        rise = value - best
        above = rise > margin * fall and fall > 0
        if curve.positive:
            above = above and value > ratio * best
        run = run + 1 if above else 0
    if run < patience:
        return None
    value = values[-1]
    return Verdict(
        "divergence",
        f"{curve.name} {abs(value):.4g} gave back {(value - best) / (first - best):.0%} of its "
        f"fall from {abs(first):.4g} to best {abs(best):.4g} (> {margin:.0%}) for {run} epochs "
        f"at epoch {steps[-1]}",
        True,
    )


def grad_explosion(curve: Curve, *, factor: float) -> Verdict | None:
    """The gradient norm is `factor` x above the median of its earlier epochs."""
    norms = curve.extras.get("grad_norm", [])
    earlier = sorted(n for n in norms[:-1] if math.isfinite(n) and n > 0)
    if len(earlier) < 2 or not math.isfinite(norms[-1]):
        return None
    median = earlier[len(earlier) // 2]
    if norms[-1] <= factor * median:
        return None
    return Verdict(
        "divergence",
        f"grad_norm {norms[-1]:.4g} > {factor:g} x median {median:.4g} of earlier epochs at "
        f"epoch {curve.steps[-1]}",
        True,
    )


def explosion(curve: Curve, *, factor: float, untrained: float | None) -> Verdict | None:
    """A positive loss above `factor` x its first value (or x the untrained loss if smaller)."""
    steps, values = curve.finite()
    if not curve.positive or not values:
        return None
    reference = values[0] if untrained is None else min(values[0], untrained)
    if values[-1] <= factor * reference:
        return None
    return Verdict(
        "explosion",
        f"{curve.name} {values[-1]:.4g} > {factor:g} x reference {reference:.4g} at epoch "
        f"{steps[-1]}",
        True,
    )


def stall(curve: Curve, *, epochs: int, tolerance: float) -> Verdict | None:
    """After `epochs` epochs the best loss is within `tolerance` of the first one."""
    steps, values = curve.finite()
    if not values or steps[-1] < epochs:
        return None
    first, best = values[0], min(values)
    if first - best > tolerance * abs(first):
        return None
    return Verdict(
        "stall",
        f"{curve.name} best {abs(best):.4g} is within {tolerance:.0%} of its first value "
        f"{abs(first):.4g} after {steps[-1]} epochs",
        False,
    )


class TrendPruner(BasePruner):
    """Prune a trial whose own trend cannot bring it down to the peers' `percentile`.

    At each step after `n_warmup_steps`, the trial's best value so far is projected to the
    horizon (the last step of completed peers) along its recent rate of improvement (over
    `window` epochs, times `optimism`). It is pruned when even that projection is worse than the
    `percentile` of the completed peers' values. A slow starter that is improving fast projects
    far and is kept; a trial that is behind and flat is stopped.

    NaN/inf: non-finite values are skipped (the `non-finite` rule of `DivergencePruner` handles
    them); a trial with no finite value is never pruned by this rule.

    Cost: the peers' values are cached per process and re-read after `refresh` decisions, where
    `refresh` grows with the study (1 per 50 completed trials), so a decision is O(1) amortized.

    Args:
        percentile: the peers' percentile (0-100, lower = kept only if it can reach the best).
        n_startup_trials: no pruning before this many trials are complete.
        n_warmup_steps: no pruning before this step.
        window: epochs over which the recent rate of improvement is measured.
        optimism: multiplies the projected improvement (> 1 keeps more trials).
    """

    def __init__(
        self,
        *,
        percentile: float = 50.0,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 10,
        window: int = 5,
        optimism: float = 1.0,
    ) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], but got {percentile=}")
        for name, value in [
            ("n_startup_trials", n_startup_trials),
            ("n_warmup_steps", n_warmup_steps),
        ]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, but got {name}={value!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, but got {window=}")
        if not optimism >= 0:
            raise ValueError(f"optimism must be >= 0, but got {optimism=}")
        self.percentile = percentile
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps
        self.window = window
        self.optimism = optimism
        self._peers: list[float] = []
        self._horizon = 0
        self._calls_left = 0

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.decide(study, trial) is not None

    def decide(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """The comparative verdict, or None to keep the trial."""
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return None
        steps, values = Curve.of(trial, study.direction).finite()
        if not values:
            return None
        self._refresh(study)
        if len(self._peers) < max(1, self.n_startup_trials):
            return None
        best = min(values)
        then = min(v for s, v in zip(steps, values, strict=True) if s <= step - self.window)
        rate = max(0.0, then - best) / self.window if steps[0] <= step - self.window else 0.0
        projected = best - self.optimism * rate * max(0, self._horizon - step)
        reference = _percentile(self._peers, self.percentile)
        if projected <= reference:
            return None
        return Verdict(
            "comparative",
            f"best {abs(best):.4g} improving {rate:.3g}/epoch projects to {abs(projected):.4g} "
            f"by epoch {self._horizon}, worse than the {self.percentile:g}th percentile "
            f"{abs(reference):.4g} of {len(self._peers)} completed trials at epoch {step}",
            False,
        )

    def _refresh(self, study: optuna.Study) -> None:
        if self._calls_left > 0:
            self._calls_left -= 1
            return
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        self._peers = sorted(sign * t.value for t in complete if t.value is not None)
        self._horizon = max((t.last_step or 0 for t in complete), default=0)
        self._calls_left = len(self._peers) // 50


class DivergencePruner(BasePruner):
    """Prune diverged, exploded, non-finite or stalled trials, then ask `comparative`.

    Own-curve rules read only the frozen trial given to `prune` (its intermediate values and the
    `epoch_metrics` user attribute) and make no query for other trials.

    NaN/inf, rule by rule:
        non-finite: a NaN or +-inf metric, `train_loss` or `grad_norm` prunes at that epoch,
            before any warm-up, startup or other guard.
        divergence: non-finite values are skipped when finding the best and the fall; a
            non-finite `grad_norm` is the non-finite rule's.
        explosion, stall: computed on the finite values only.
        comparative: `TrendPruner` skips non-finite values; a wrapped Optuna pruner applies its
            own documented behaviour.
        With `non-finite` left out of `rules`, a NaN trial is judged on its finite values.

    Args:
        comparative: the pruner asked when no rule fires; `None` for own-curve rules only.
        rules: the subset of `RULES` to apply.
        divergence_margin: fraction of the fall from the first value to the best that a
            rebound must give back.
        divergence_ratio: a positive loss must also exceed this multiple of its best.
        divergence_patience: consecutive epochs the rebound must last.
        grad_explosion_factor: a gradient norm this many times the median of its earlier epochs
            is divergence (`None` turns it off).
        explosion_factor: a positive loss this many times its reference is an explosion.
        untrained_loss: the loss of the untrained model (e.g. ln(classes) for cross-entropy);
            `None` uses the first reported value.
        stall_epochs: the stall rule waits this many epochs.
        stall_tolerance: the best must have fallen by more than this fraction of the first.
        mark_infeasible: set the `diverged` constraint on infeasible prunes.
    """

    def __init__(
        self,
        comparative: BasePruner | None = None,
        *,
        rules: Collection[str] = RULES,
        divergence_margin: float = 0.3,
        divergence_ratio: float = 1.3,
        divergence_patience: int = 2,
        grad_explosion_factor: float | None = None,
        explosion_factor: float = 3.0,
        untrained_loss: float | None = None,
        stall_epochs: int = 10,
        stall_tolerance: float = 0.02,
        mark_infeasible: bool = True,
    ) -> None:
        unknown = sorted(set(rules) - set(RULES))
        if unknown:
            raise ValueError(f"rules must be among {list(RULES)}, but got {unknown}")
        checks = [
            ("divergence_margin", divergence_margin, 0.0),
            ("divergence_ratio", divergence_ratio, 1.0),
            ("divergence_patience", divergence_patience, 1),
            ("explosion_factor", explosion_factor, 1.0),
            ("stall_epochs", stall_epochs, 1),
            ("stall_tolerance", stall_tolerance, 0.0),
        ]
        if grad_explosion_factor is not None:
            checks.append(("grad_explosion_factor", grad_explosion_factor, 1.0))
        if untrained_loss is not None:
            checks.append(("untrained_loss", untrained_loss, 0.0))
        for name, value, low in checks:
            if not value >= low:
                raise ValueError(f"{name} must be >= {low}, but got {name}={value!r}")
        self.comparative = comparative
        self.rules = tuple(r for r in RULES if r in rules)
        self.divergence_margin = divergence_margin
        self.divergence_ratio = divergence_ratio
        self.divergence_patience = divergence_patience
        self.grad_explosion_factor = grad_explosion_factor
        self.explosion_factor = explosion_factor
        self.untrained_loss = untrained_loss
        self.stall_epochs = stall_epochs
        self.stall_tolerance = stall_tolerance
        self.mark_infeasible = mark_infeasible

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        verdict = self.decide(study, trial)
        if verdict is None:
            return False
        record(study, trial, verdict, mark_infeasible=self.mark_infeasible)
        return True

    def decide(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """The first rule that fires, else the comparative verdict, else None."""
        if trial.last_step is None:
            return None
        verdict = self._own_curve(Curve.of(trial, study.direction))
        if verdict is not None or self.comparative is None:
            return verdict
        if isinstance(self.comparative, TrendPruner):
            return self.comparative.decide(study, trial)
        if not self.comparative.prune(study, trial):
            return None
        name = type(self.comparative).__name__
        return Verdict("comparative", f"pruned by {name} at epoch {trial.last_step}", False)

    def _own_curve(self, curve: Curve) -> Verdict | None:
        for rule in self.rules:
            if rule == "non-finite":
                verdict = non_finite(curve)
            elif rule == "divergence":
                verdict = divergence(
                    curve,
                    margin=self.divergence_margin,
                    ratio=self.divergence_ratio,
                    patience=self.divergence_patience,
                )
                if verdict is None and self.grad_explosion_factor is not None:
                    verdict = grad_explosion(curve, factor=self.grad_explosion_factor)
            elif rule == "explosion":
                verdict = explosion(
                    curve, factor=self.explosion_factor, untrained=self.untrained_loss
                )
            else:
                verdict = stall(curve, epochs=self.stall_epochs, tolerance=self.stall_tolerance)
            if verdict is not None:
                return verdict
        return None


def record(
    study: optuna.Study, trial: FrozenTrial, verdict: Verdict, *, mark_infeasible: bool = True
) -> None:
    """Store the verdict in the trial's user attributes (and the `diverged` constraint).

    The given frozen trial's `user_attrs` is updated too: `Trial.should_prune` hands the pruner
    a shallow copy of the trial's cache, so the `optuna.Trial` sees the reason at once.
    """
    storage, trial_id = study._storage, trial._trial_id
    attrs = {
        "prune_rule": verdict.rule,
        "prune_reason": verdict.reason,
        "infeasible": verdict.infeasible,
    }
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
        trial.user_attrs[key] = value
    key = f"constraints:{CONSTRAINT}"
    if verdict.infeasible and mark_infeasible and key not in trial.system_attrs:
        storage.set_trial_system_attr(trial_id, key, 1.0)
    logger.info("Trial %d pruned (%s): %s.", trial.number, verdict.rule, verdict.reason)


def default_pruner() -> BasePruner:
    """The pruner a study gets when its spec says nothing about pruning."""
    return DivergencePruner(TrendPruner())


def make_pruner(name: str, options: dict[str, Any]) -> BasePruner:
    """Build the pruner named in a spec's `pruning.pruner` with its keyword options."""
    if name == "default":
        return _default_with(options)
    factories: dict[str, Any] = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "trend": TrendPruner,
    }
    if name == "patient":
        options = dict(options)
        wrapped = options.pop("wrapped", None)
        return optuna.pruners.PatientPruner(
            None if wrapped is None else make_pruner(str(wrapped), {}), **options
        )
    if name not in factories:
        known = ", ".join(["default", *factories, "patient"])
        raise ValueError(f"unknown pruner {name!r}; use one of {known}")
    try:
        return factories[name](**options)
    except TypeError as e:
        raise TypeError(f"pruner {name!r}: {e}") from e


def _default_with(options: dict[str, Any]) -> BasePruner:
    options = dict(options)
    trend = {k: options.pop(k) for k in _TREND_OPTIONS if k in options}
    comparative_name = options.pop("comparative", "trend")
    if comparative_name == "trend":
        comparative: BasePruner | None = TrendPruner(**trend)
    elif trend:
        raise ValueError(f"options {sorted(trend)} need comparative: trend")
    else:
        comparative = None if comparative_name == "none" else make_pruner(comparative_name, {})
    try:
        return DivergencePruner(comparative, **options)
    except TypeError as e:
        raise TypeError(f"pruner 'default': {e}") from e


_TREND_OPTIONS = ("percentile", "n_startup_trials", "n_warmup_steps", "window", "optimism")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _same(a: Any, b: float) -> bool:
    try:
        a = float(a)
    except (TypeError, ValueError):
        return False
    return a == b or (math.isnan(a) and math.isnan(b))
