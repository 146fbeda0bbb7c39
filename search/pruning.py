"""Pruners: divergence rules on a trial's own curve, then a trend-aware comparison with peers.

`DivergencePruner` applies its own-curve rules in order and prunes on the first that fires; if
none does, it hands the decision to the comparative pruner it wraps (`TrendPruner` by default,
or any Optuna pruner). Scores are flipped once (maximize -> negated) so every rule reads "lower
is better". `default_pruner()` won the replay of real learning curves in
`benchmarks/pruning/RESULTS.md`.

===========  ==================================================================  ==========
rule         fires when                                                          infeasible
===========  ==================================================================  ==========
non-finite   the metric, `train_loss` or `grad_norm` is NaN or +-inf             yes
divergence   the loss fell, then gave back part of its fall for epochs in a row  yes
             (confirmed by `train_loss`), or `grad_norm` exploded
explosion    the loss (and `train_loss`) stays far above where it started        yes
stall        after warm-up the loss has barely moved from where it started       no
comparative  behind its peers now, and not improving fast enough to catch up     no
===========  ==================================================================  ==========

Every prune stores `prune_rule`, `prune_reason` (a sentence with the numbers) and `infeasible`
in the trial's user attributes; an infeasible prune also sets the Optuna 5 constraint
`constraints:diverged = 1.0`. TPE learns to avoid a diverging region because the trial is
reported (pruned, not failed); the constraint adds to that for constraint-aware samplers, not
for single-objective TPE (see the sampler-feedback section of the RESULTS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial

from search import optuna_compat
from search.curves import (
    RULES,
    Curve,
    Verdict,
    check_ranges,
    divergence,
    explosion,
    grad_explosion,
    non_finite,
    stall,
)
from search.record import CONSTRAINT_KEY, record_prune
from search.trend import Peers, TrendPruner

__all__ = [
    "RULES",
    "Curve",
    "DivergencePruner",
    "TrendPruner",
    "Verdict",
    "default_pruner",
    "make_pruner",
    "record",
]

logger = logging.getLogger(__name__)


class DivergencePruner(BasePruner):
    """Prune non-finite, diverged, exploded or stalled trials, else ask `comparative`.

    The own-curve rules read only the frozen trial given to `prune` (its intermediate values
    and its `epoch_metrics` user attribute) and make no query for other trials; they apply
    from the first epoch, before any startup or warm-up guard of the comparative pruner.
    The defaults were calibrated on the tuning part of `benchmarks/pruning/curves`.

    NaN/inf, rule by rule:
        non-finite: a NaN or +-inf metric, `train_loss` or `grad_norm` prunes at that epoch.
        divergence: non-finite entries are skipped when finding the fall and the rebound; a
            non-finite `grad_norm` is left to the non-finite rule.
        explosion, stall: computed on the finite values; they apply only to a positive metric
            that the study minimizes (a loss) and never fire otherwise.
        comparative: `TrendPruner` skips non-finite values; a wrapped Optuna pruner applies
            its own documented behaviour.
        With `non-finite` left out of `rules`, a NaN trial is judged on its finite values.

    Args:
        comparative: the pruner asked when no rule fires; `None` for own-curve rules only.
        rules: the subset of `RULES` to apply.
        divergence_margin: fraction of its fall that a rebound gives back (metric and
            `train_loss`).
        divergence_patience: consecutive epochs the rebound lasts.
        unconfirmed_margin: the margin when the trial reports no `train_loss`.
        grad_explosion_factor: a `grad_norm` this many times the median of its earlier
            epochs is divergence; `None` turns the check off.
        explosion_factor: a loss this many times its reference is an explosion.
        explosion_patience: consecutive epochs the explosion lasts.
        untrained_loss: the untrained model's loss (ln(classes) for cross-entropy), the
            explosion reference of the metric and `train_loss`; `None` uses the first reported
            value and the best `train_loss` so far. Beware: a run that starts far above it and
            recovers (batch norm) is then pruned.
        stall_epochs: the stall rule waits this many epochs.
        stall_tolerance: fraction of the start that counts as having moved.
        stall_window: the last epochs that must also span less than the tolerance.
        mark_infeasible: set the `diverged` constraint on infeasible prunes.
    """

    def __init__(
        self,
        comparative: BasePruner | None = None,
        *,
        rules: Collection[str] = RULES,
        divergence_margin: float = 0.4,
        divergence_patience: int = 2,
        unconfirmed_margin: float = 1.5,
        grad_explosion_factor: float | None = 30.0,
        explosion_factor: float = 3.0,
        explosion_patience: int = 2,
        untrained_loss: float | None = None,
        stall_epochs: int = 10,
        stall_tolerance: float = 0.05,
        stall_window: int = 5,
        mark_infeasible: bool = True,
    ) -> None:
        if isinstance(rules, str) or set(rules) - set(RULES):
            raise ValueError(f"rules must be a list drawn from {list(RULES)}, but got {rules=}")
        check_ranges(
            divergence_margin=(divergence_margin, 0), unconfirmed_margin=(unconfirmed_margin, 0)
        )
        check_ranges(divergence_patience=(divergence_patience, 1), stall_epochs=(stall_epochs, 1))
        check_ranges(
            explosion_factor=(explosion_factor, 1), explosion_patience=(explosion_patience, 1)
        )
        check_ranges(stall_tolerance=(stall_tolerance, 0), stall_window=(stall_window, 2))
        if grad_explosion_factor is not None:
            check_ranges(grad_explosion_factor=(grad_explosion_factor, 1))
        if untrained_loss is not None:
            check_ranges(untrained_loss=(untrained_loss, 0))
        self.comparative = comparative
        self.rules = tuple(r for r in RULES if r in rules)
        self.divergence_margin = divergence_margin
        self.divergence_patience = divergence_patience
        self.unconfirmed_margin = unconfirmed_margin
        self.grad_explosion_factor = grad_explosion_factor
        self.explosion_factor = explosion_factor
        self.explosion_patience = explosion_patience
        self.untrained_loss = untrained_loss
        self.stall_epochs = stall_epochs
        self.stall_tolerance = stall_tolerance
        self.stall_window = stall_window
        self.mark_infeasible = mark_infeasible

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        verdict = self.decide(study, trial)
        if verdict is not None:
            record(study, trial, verdict, mark_infeasible=self.mark_infeasible)
        return verdict is not None

    def decide(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """The first own-curve rule that fires, else the comparative verdict, else None."""
        if trial.last_step is None:
            return None
        verdict = self.judge(Curve.of(trial, study.direction), None)
        if verdict is not None:
            return verdict
        if isinstance(self.comparative, TrendPruner):
            return self.comparative.decide(study, trial)
        if self.comparative is None or not self.comparative.prune(study, trial):
            return None
        name = type(self.comparative).__name__
        return Verdict("comparative", f"pruned by {name} at epoch {trial.last_step}", False)

    def judge(self, curve: Curve, peers: Peers | None) -> Verdict | None:
        """The own-curve rules, then `TrendPruner`'s comparison with `peers`; pure, no I/O.

        A wrapped Optuna pruner (not a `TrendPruner`) is not asked here: it needs a study.
        """
        if not curve.steps:
            return None
        for rule in self.rules:
            verdict = self._apply(rule, curve)
            if verdict is not None:
                return verdict
        if isinstance(self.comparative, TrendPruner):
            return self.comparative.judge(curve, peers)
        return None

    def _apply(self, rule: str, curve: Curve) -> Verdict | None:
        if rule == "non-finite":
            return non_finite(curve)
        if rule == "divergence":
            verdict = divergence(
                curve,
                margin=self.divergence_margin,
                patience=self.divergence_patience,
                unconfirmed_margin=self.unconfirmed_margin,
            )
            if verdict is None and self.grad_explosion_factor is not None:
                verdict = grad_explosion(curve, factor=self.grad_explosion_factor)
            return verdict
        if rule == "explosion":
            factor, patience = self.explosion_factor, self.explosion_patience
            return explosion(
                curve, factor=factor, patience=patience, untrained=self.untrained_loss
            )
        return stall(
            curve,
            epochs=self.stall_epochs,
            tolerance=self.stall_tolerance,
            window=self.stall_window,
        )


def record(
    study: optuna.Study, trial: FrozenTrial, verdict: Verdict, *, mark_infeasible: bool = True
) -> None:
    """Store the verdict in the trial's user attributes, and the `diverged` constraint.

    The given frozen trial's `user_attrs` is updated too: `Trial.should_prune` hands the pruner
    a shallow copy of the `optuna.Trial`'s cache, so the caller sees the reason at once.
    """
    constrain = (
        verdict.infeasible
        and mark_infeasible
        and CONSTRAINT_KEY not in trial.system_attrs
    )
    attrs = record_prune(
        optuna_compat.storage_of(study),
        optuna_compat.trial_id(trial),
        verdict.rule,
        verdict.reason,
        infeasible=verdict.infeasible,
        constrain=constrain,
    )
    trial.user_attrs.update(attrs)
    logger.info("Trial %d pruned (%s): %s.", trial.number, verdict.rule, verdict.reason)


def default_pruner() -> BasePruner:
    """The pruner a study gets when its spec says nothing about pruning."""
    return DivergencePruner(TrendPruner())


_OPTUNA: dict[str, Any] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "threshold": optuna.pruners.ThresholdPruner,
}
_TREND = {"percentile", "target_percentile", "n_startup_trials", "n_warmup_steps", "window"}
_TREND |= {"horizon", "noise", "optimism"}


def make_pruner(name: str, options: dict[str, Any]) -> BasePruner:
    """Build the pruner a spec's `pruning:` section names, with its keyword options.

    `default` is `default_pruner()`: its options are those of `DivergencePruner` and
    `TrendPruner`, plus `comparative:` (`trend`, `none` or one of the names below) for what it
    wraps. `trend` is `TrendPruner` alone; `none`, `median`, `percentile`, `hyperband`,
    `successive_halving`, `threshold` and `patient` (`wrapped:` a name) are Optuna's.

    Raises:
        ValueError: an unknown pruner or a bad value; the message names the option.
        TypeError: an unknown option.
    """
    options = dict(options)
    try:
        if name == "default":
            wraps = str(options.pop("comparative", "trend"))
            trend = {k: options.pop(k) for k in _TREND if k in options}
            if wraps != "trend" and trend:
                raise ValueError(f"options {sorted(trend)} need comparative: trend, not {wraps!r}")
            if wraps == "trend":
                return DivergencePruner(TrendPruner(**trend), **options)
            inner = None if wraps == "none" else make_pruner(wraps, {})
            return DivergencePruner(inner, **options)
        if name == "trend":
            return TrendPruner(**options)
        if name == "patient":
            wrapped = options.pop("wrapped", None)
            inner = None if wrapped is None else make_pruner(str(wrapped), {})
            return optuna.pruners.PatientPruner(inner, **options)
        if name in _OPTUNA:
            return _OPTUNA[name](**options)
    except TypeError as e:
        raise TypeError(f"pruner {name!r}: {e}") from e
    known = ", ".join(["default", "trend", *_OPTUNA, "patient"])
    raise ValueError(f"unknown pruner {name!r}; use one of {known}")
