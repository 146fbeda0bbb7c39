"""Pruners: divergence rules on a trial's own curve, then a trend-aware comparison with peers.

`DivergencePruner` applies its own-curve rules in order and prunes on the first that fires; if
none does, it hands the decision to the comparative pruner it wraps (`TrendPruner` by default,
or any Optuna pruner). Scores are flipped once (maximize -> negated) so every rule reads "lower
is better". `default_pruner()` won the replay of real learning curves in
`benchmarks/pruning/RESULTS.md`.

===========  ==================================================================  =========
rule         fires when                                                          got good?
===========  ==================================================================  =========
non-finite   the metric, `train_loss` or `grad_norm` is NaN or +-inf             end
divergence   the metric fell (far, against its level and noise), then gave back  end
             part of its fall for settled epochs in a row (confirmed by
             `train_loss` when reported), or `grad_norm` exploded and stayed up
explosion    the metric (and `train_loss`) stays far above where it started      end
stall        after warm-up the metric has barely moved from where it started     prune
overfitting  no new best for a while, the metric rising while `train_loss` is    end
             not
comparative  behind its peers now, and not improving fast enough to catch up     end if
                                                                                 past best
===========  ==================================================================  =========

"got good?": a trial stopped by a rule marked `end` whose best so far is good (see
`DivergencePruner`) is ended at its best (`Verdict.end`: the worker records it COMPLETE with
its best value and best epoch); so is a good trial stopped by the comparison whose best is
`overfit_patience` epochs old (one still improving is PRUNED: its value is unfinished);
otherwise it is PRUNED, and for non-finite, divergence and explosion infeasible. Every stop
stores `prune_rule`, `prune_reason` (a sentence with the numbers) and `infeasible` in the
trial's user attributes (`search.record` keys); an infeasible prune also sets the Optuna 5
constraint `constraints:diverged = 1.0`. TPE learns to avoid a diverging region because the
trial is reported (pruned, not failed).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial

from search.curves import (
    RULES,
    Curve,
    Verdict,
    check_ranges,
    divergence,
    explosion,
    grad_explosion,
    non_finite,
    overfitting,
    stall,
)
from search.optuna_compat import storage_of, trial_id
from search.record import CONSTRAINT_KEY, record_prune
from search.trend import PeerCache, Peers, TrendPruner

__all__ = [
    "RULES",
    "Curve",
    "DivergencePruner",
    "Peers",
    "TrendPruner",
    "Verdict",
    "default_pruner",
    "make_pruner",
    "record",
]

logger = logging.getLogger(__name__)


class DivergencePruner(BasePruner):
    """Stop non-finite, diverged, exploded, stalled or overfitting trials, else ask
    `comparative`; a trial that got good before it degraded is ended at its best, not lost.

    `judge(curve, peers)` is the decision, pure (no I/O, no study): the first own-curve rule
    of `rules` that fires, else `TrendPruner.judge` when `comparative` is one. A verdict of
    `non-finite`, `divergence`, `explosion` or `overfitting` on a trial whose best so far is
    good — at least as good as the `good_percentile` of the finished peers' bests (pruned
    ones included: the complete ones alone are the pruning's survivors), or, with fewer than
    `n_startup_trials` complete peers (or none), any real fall from its first value — or a
    comparative verdict on a good trial whose best is `overfit_patience` epochs old, has
    `end=True`: the worker records the trial COMPLETE with its best value and best epoch
    ("end, don't lose"), feasible. Any other verdict prunes. `prune(study, trial)` (Optuna's
    contract) builds the curve from the frozen trial and the peers from the study, records
    the verdict (`record`) and returns True for both kinds; a wrapped Optuna pruner (not a
    `TrendPruner`) is asked only there, when `judge` keeps the trial.

    The own-curve rules read only the curve; in `prune` a trial that is kept makes no query
    for other trials before the comparative's warm-up step (a stop reads the peers once, to
    tell pruned from ended). They apply from the first epoch. Guards, rule by rule (see
    `search.curves`):
        divergence: the fall must be >= `min_fall` x the curve's level (a positive loss:
            its highest value before the best, or the study's typical fall `Peers.spread`
            when larger; any other metric: the study's typical fall) and >= `noise_factor` x
            the curve's own epoch-to-epoch noise;
            rises during the warm-up (`warmup_epochs` param) or within 2 epochs of a rise of
            the reported `lr` (warm-up, restart) do not count. The metric-only mode (no
            `train_loss`) uses `unconfirmed_margin` and the same patience, so the rebound
            3.2 -> 1.8 -> 2.5 -> 2.6 stops at epoch 4.
        grad_norm: a spike counts only when it lasts `grad_explosion_patience` epochs.
        stall: a flat run (too-small learning rate) is `stall`, never `divergence`: its
            fall is too small for the divergence guards.

    Scale and sign: every threshold is a ratio of the curve's own values (or the study's
    spread), so multiplying the metric by any positive constant gives the same decisions;
    a maximized metric is flipped; explosion and stall measure against `|reference|`, so a
    negative or zero-crossing metric is judged too.

    NaN/inf, rule by rule:
        non-finite: a NaN or +-inf metric, `train_loss` or `grad_norm` stops at that epoch
            (ended at its best if it was good, else pruned as infeasible).
        divergence, overfitting: non-finite entries are skipped when finding the fall and
            the rebound; a non-finite `grad_norm` is left to the non-finite rule.
        explosion, stall: computed on the finite values.
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
        min_fall: the smallest fall, as a fraction of the curve's level, that a rebound can
            give back.
        noise_factor: the smallest fall a rebound can give back, and the smallest rise of an
            overfitting run, in multiples of the curve's own noise.
        grad_explosion_factor: a `grad_norm` this many times the median of its earlier
            epochs is divergence; `None` turns the check off.
        grad_explosion_patience: epochs in a row the `grad_norm` spike lasts.
        explosion_factor: a loss this many times its reference is an explosion.
        explosion_patience: consecutive epochs the explosion lasts.
        untrained_loss: the untrained model's loss (ln(classes) for cross-entropy), the
            explosion reference of the metric and `train_loss`; `None` uses the first reported
            value and the best `train_loss` so far.
        stall_epochs: the stall rule waits this many epochs.
        stall_tolerance: fraction of the start that counts as having moved.
        stall_window: the last epochs that must also span less than the tolerance.
        overfit_margin: fraction of its fall an overfitting run gives back, every epoch of
            `overfit_patience` epochs without a new best.
        overfit_patience: epochs without a new best before an overfitting run ends.
        good_percentile: a best at least this good among the finished peers' bests is
            "good": the trial is ended at its best instead of pruned.
        mark_infeasible: set the `diverged` constraint on infeasible prunes.
    """

    def __init__(
        self,
        comparative: BasePruner | None = None,
        *,
        rules: Collection[str] = RULES,
        divergence_margin: float = 0.4,
        divergence_patience: int = 2,
        unconfirmed_margin: float = 0.4,
        min_fall: float = 0.1,
        noise_factor: float = 3.0,
        grad_explosion_factor: float | None = 30.0,
        grad_explosion_patience: int = 2,
        explosion_factor: float = 3.0,
        explosion_patience: int = 2,
        untrained_loss: float | None = None,
        stall_epochs: int = 10,
        stall_tolerance: float = 0.05,
        stall_window: int = 5,
        overfit_margin: float = 0.05,
        overfit_patience: int = 3,
        good_percentile: float = 50.0,
        mark_infeasible: bool = True,
    ) -> None:
        if isinstance(rules, str) or set(rules) - set(RULES):
            raise ValueError(f"rules must be a list drawn from {list(RULES)}, but got {rules=}")
        check_ranges(
            divergence_margin=(divergence_margin, 0), unconfirmed_margin=(unconfirmed_margin, 0)
        )
        check_ranges(divergence_patience=(divergence_patience, 1), stall_epochs=(stall_epochs, 1))
        check_ranges(min_fall=(min_fall, 0), noise_factor=(noise_factor, 0))
        check_ranges(
            explosion_factor=(explosion_factor, 1), explosion_patience=(explosion_patience, 1)
        )
        check_ranges(stall_tolerance=(stall_tolerance, 0), stall_window=(stall_window, 2))
        check_ranges(overfit_margin=(overfit_margin, 0), overfit_patience=(overfit_patience, 1))
        check_ranges(
            grad_explosion_patience=(grad_explosion_patience, 1),
            good_percentile=(good_percentile, 0, 100),
        )
        if grad_explosion_factor is not None:
            check_ranges(grad_explosion_factor=(grad_explosion_factor, 1))
        if untrained_loss is not None:
            check_ranges(untrained_loss=(untrained_loss, 0))
        self.comparative = comparative
        self.rules = tuple(r for r in RULES if r in rules)
        self.divergence_margin = divergence_margin
        self.divergence_patience = divergence_patience
        self.unconfirmed_margin = unconfirmed_margin
        self.min_fall = min_fall
        self.noise_factor = noise_factor
        self.grad_explosion_factor = grad_explosion_factor
        self.grad_explosion_patience = grad_explosion_patience
        self.explosion_factor = explosion_factor
        self.explosion_patience = explosion_patience
        self.untrained_loss = untrained_loss
        self.stall_epochs = stall_epochs
        self.stall_tolerance = stall_tolerance
        self.stall_window = stall_window
        self.overfit_margin = overfit_margin
        self.overfit_patience = overfit_patience
        self.good_percentile = good_percentile
        self.mark_infeasible = mark_infeasible
        trend = comparative if isinstance(comparative, TrendPruner) else None
        self.cache = trend.cache if trend is not None else PeerCache()
        self.n_startup_trials = trend.n_startup_trials if trend is not None else 5
        self._peers_from = trend.earliest_step if trend is not None else 1

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.stop(study, trial) is not None

    def stop(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """`decide`, and a verdict recorded on the trial (`record`): what `prune` does, with
        the verdict kept, so a caller can tell an end from a prune."""
        verdict = self.decide(study, trial)
        if verdict is not None:
            record(study, trial, verdict, mark_infeasible=self.mark_infeasible)
        return verdict

    def decide(self, study: optuna.Study, trial: FrozenTrial) -> Verdict | None:
        """`judge` on the frozen trial and the study's peers, else the wrapped Optuna pruner."""
        step = trial.last_step
        if step is None:
            return None
        curve = Curve.of(trial, study.direction)
        if step >= self._peers_from:
            verdict = self.judge(curve, self.cache.get(study))
        else:  # read the peers only to tell pruned from ended
            verdict = self.judge(curve, self.cache.cached(study))
            if verdict is not None:
                verdict = self.judge(curve, self.cache.get(study))
        if verdict is not None or self.comparative is None:
            return verdict
        if isinstance(self.comparative, TrendPruner) or not self.comparative.prune(study, trial):
            return None
        name = type(self.comparative).__name__
        return Verdict("comparative", f"pruned by {name} at epoch {step}", False)

    def judge(self, curve: Curve, peers: Peers | None) -> Verdict | None:
        """The first own-curve rule that fires (ended at the best if the trial got good),
        else `TrendPruner.judge`, else None. Pure: no I/O."""
        if not curve.steps:
            return None
        scale = peers.spread() if peers is not None else None
        for rule in self.rules:
            verdict = self._apply(rule, curve, scale)
            if verdict is not None:
                return self._settle(verdict, curve, peers)
        if isinstance(self.comparative, TrendPruner):
            verdict = self.comparative.judge(curve, peers)
            if verdict is not None and not verdict.end and self.past_best(curve):
                return self._settle(verdict, curve, peers)
            return verdict
        return None

    def got_good(self, curve: Curve, peers: Peers | None) -> bool:
        """Whether the trial's best so far is good enough to keep: among the best
        `good_percentile` of the finished peers' bests (pruned ones included, so the bar does
        not rise as the weak are pruned), or (too few complete peers) below its first value."""
        _, values = curve.finite()
        if not values:
            return False
        best = min(values)
        if peers is None or peers.complete < max(1, self.n_startup_trials):
            return best < values[0]
        return best <= peers.rank(self.good_percentile)

    def past_best(self, curve: Curve) -> bool:
        """Whether the trial's best is `overfit_patience` or more epochs old: it has stopped
        improving, so its best is its result (a trial still improving is not done)."""
        steps, best_epoch = curve.finite()[0], curve.best_epoch
        return best_epoch is not None and steps[-1] - best_epoch >= self.overfit_patience

    def _settle(self, verdict: Verdict, curve: Curve, peers: Peers | None) -> Verdict:
        if verdict.rule == "stall" or not self.got_good(curve, peers):
            return verdict
        best = min(curve.finite()[1])
        reason = (
            f"{verdict.reason}; ended at its best {curve.shown(best)} (epoch {curve.best_epoch})"
        )
        return Verdict(verdict.rule, reason, False, end=True)

    def _apply(self, rule: str, curve: Curve, scale: float | None) -> Verdict | None:
        if rule == "non-finite":
            return non_finite(curve)
        if rule == "divergence":
            confirmed = curve.reported("train_loss")
            verdict = divergence(
                curve,
                margin=self.divergence_margin if confirmed else self.unconfirmed_margin,
                patience=self.divergence_patience,
                min_fall=self.min_fall,
                noise_factor=self.noise_factor,
                scale=scale,
            )
            if verdict is None and self.grad_explosion_factor is not None:
                verdict = grad_explosion(
                    curve, factor=self.grad_explosion_factor, patience=self.grad_explosion_patience
                )
            return verdict
        if rule == "explosion":
            factor, patience = self.explosion_factor, self.explosion_patience
            return explosion(
                curve, factor=factor, patience=patience, untrained=self.untrained_loss
            )
        if rule == "overfitting":
            return overfitting(
                curve,
                margin=self.overfit_margin,
                patience=self.overfit_patience,
                noise_factor=self.noise_factor,
                min_fall=self.min_fall,
                scale=scale,
            )
        return stall(
            curve,
            epochs=self.stall_epochs,
            tolerance=self.stall_tolerance,
            window=self.stall_window,
            scale=scale,
        )


def record(
    study: optuna.Study, trial: FrozenTrial, verdict: Verdict, *, mark_infeasible: bool = True
) -> dict[str, Any]:
    """Store the verdict in the trial's user attributes (`search.record.record_prune`:
    `prune_rule`, `prune_reason`, `infeasible`), and the `diverged` constraint on an
    infeasible one.

    The given frozen trial's `user_attrs` is updated too: `Trial.should_prune` hands the pruner
    a shallow copy of the `optuna.Trial`'s cache, so the caller sees the reason at once.

    Returns:
        The user attributes written.
    """
    attrs = record_prune(
        storage_of(study),
        trial_id(trial),
        verdict.rule,
        verdict.reason,
        infeasible=verdict.infeasible,
        constrain=(
            verdict.infeasible and mark_infeasible and CONSTRAINT_KEY not in trial.system_attrs
        ),
    )
    trial.user_attrs.update(attrs)
    how = "ended at its best" if verdict.end else "pruned"
    logger.info("Trial %d %s (%s): %s.", trial.number, how, verdict.rule, verdict.reason)
    return attrs


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
_TREND |= {"horizon", "noise", "optimism", "refresh_every", "end_percentile"}


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
