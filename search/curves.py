"""A trial's own learning curve and the divergence rules that read it, as pure functions.

Each rule takes a `Curve` (the trial's values flipped so lower is better, with `train_loss`
and `grad_norm` where reported) and returns a `Verdict` or None. No rule queries the storage.
See `search.pruning` for the rule table and NaN/inf behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from search.record import epoch_rows

RULES = ("non-finite", "divergence", "explosion", "stall")


@dataclass(frozen=True)
class Verdict:
    """Why a trial is pruned: the rule, a sentence with its numbers, and its feasibility."""

    rule: str
    reason: str
    infeasible: bool
    end: bool = False  # True: end the trial as COMPLETE at its best, not PRUNED


@dataclass(frozen=True)
class Curve:
    """One trial's curve, flipped so that lower is better, with `train_loss` and `grad_norm`
    (NaN where not reported). `positive`: a minimized metric never below 0 (a loss)."""

    name: str
    steps: list[int]
    values: list[float]
    extras: dict[str, list[float]]
    positive: bool
    sign: float = 1.0

    @classmethod
    def of(cls, trial: FrozenTrial, direction: StudyDirection) -> Curve:
        """Read the curve from the frozen trial alone (no storage query)."""
        rows = {int(r.get("epoch", -1)): r for r in epoch_rows(trial)}
        steps = sorted(trial.intermediate_values)
        merged = [{**rows.get(s, {}), "epoch": s} for s in steps]
        raw = [float(trial.intermediate_values[s]) for s in steps]
        last = rows.get(steps[-1], {}) if steps else {}
        name = next((k for k, v in last.items() if k != "epoch" and _same(v, raw[-1])), "value")
        for row, value in zip(merged, raw, strict=True):
            row[name] = value
        return cls.from_rows(merged, metric=name, direction=direction, params=trial.params)

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping[str, Any]],
        *,
        metric: str,
        direction: StudyDirection,
        params: Mapping[str, Any] | None = None,
    ) -> Curve:
        """Build the curve from in-memory per-epoch rows (`{"epoch": 1, metric: ..., ...}`),
        as the worker holds them; no storage query."""
        steps = [int(r["epoch"]) for r in rows]
        raw = [float(r.get(metric, math.nan)) for r in rows]
        extras = {
            k: [float(r.get(k, math.nan)) for r in rows] for k in ("train_loss", "grad_norm")
        }
        sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
        positive = sign > 0 and all(v >= 0 for v in raw if math.isfinite(v))
        return cls(metric, steps, [sign * v for v in raw], extras, positive, sign)

    def shown(self, value: float) -> str:
        """A flipped value as the trial reported it."""
        return f"{self.sign * value:.4g}"

    def reported(self, key: str) -> bool:
        return any(not math.isnan(v) for v in self.extras[key])

    def finite(self) -> tuple[list[int], list[float]]:
        pairs = [(s, v) for s, v in zip(self.steps, self.values, strict=True) if math.isfinite(v)]
        return [s for s, _ in pairs], [v for _, v in pairs]


def non_finite(curve: Curve) -> Verdict | None:
    """NaN or +-inf in the metric, `train_loss` or `grad_norm` at any reported epoch."""
    reported = {k: v for k, v in curve.extras.items() if curve.reported(k)}
    for i, step in enumerate(curve.steps):
        checks = [(curve.name, curve.values[i]), *((k, v[i]) for k, v in reported.items())]
        for key, value in checks:
            if not math.isfinite(value):
                return Verdict("non-finite", f"{key} is {value} at epoch {step}", True)
    return None


def divergence(
    curve: Curve, *, margin: float, patience: int, unconfirmed_margin: float
) -> Verdict | None:
    """The metric gave back more than `margin` of its fall (from the highest value before its
    best to that best) for `patience` epochs in a row, and `train_loss` did too (overfitting
    raises only the metric). Without `train_loss`, the metric alone must give back
    `unconfirmed_margin` for one epoch more. Non-finite entries are skipped."""
    confirmed = curve.reported("train_loss")
    if not confirmed:
        margin, patience = unconfirmed_margin, patience + 1
    given = _given_back(curve.values)
    train = _given_back(curve.extras["train_loss"]) if confirmed else given
    run = 0
    for metric_back, train_back in zip(given, train, strict=True):
        if not math.isnan(metric_back):
            run = run + 1 if metric_back > margin and not train_back <= margin else 0
    if run < patience:
        return None
    steps, values = curve.finite()
    best = values.index(min(values))
    top = max(values[: best + 1])
    last = [g for g in given if not math.isnan(g)][-1]
    return Verdict(
        "divergence",
        f"{curve.name} {curve.shown(values[-1])} gave back {last:.0%} of its fall from "
        f"{curve.shown(top)} to best {curve.shown(values[best])} (> {margin:.0%}"
        f"{', train_loss too' if confirmed else ''}) for {run} epochs at epoch {steps[-1]}",
        True,
    )


def grad_explosion(curve: Curve, *, factor: float) -> Verdict | None:
    """A finite `grad_norm` above `factor` x the median of its earlier epochs (2 or more)."""
    norms = curve.extras["grad_norm"]
    earlier = sorted(n for n in norms[:-1] if math.isfinite(n) and n > 0)
    if len(earlier) < 2 or not math.isfinite(norms[-1]):
        return None
    median = earlier[len(earlier) // 2]
    if not norms[-1] > factor * median:
        return None
    return Verdict(
        "divergence",
        f"grad_norm {norms[-1]:.4g} > {factor:g} x the median {median:.4g} of earlier epochs "
        f"at epoch {curve.steps[-1]}",
        True,
    )


def explosion(
    curve: Curve, *, factor: float, patience: int, untrained: float | None
) -> Verdict | None:
    """A positive loss above `factor` x its reference (`untrained` if given, else its first
    finite value; never if that is 0) for `patience` epochs in a row, with `train_loss` (if
    reported) above `factor` x `untrained` or x its best so far too: a validation spike on
    calm training is left alone."""
    steps, values = curve.finite()
    if not curve.positive or not values:
        return None
    reference = values[0] if untrained is None else untrained
    if reference <= 0:
        return None
    run, train_best = 0, math.inf
    for value, train in zip(curve.values, curve.extras["train_loss"], strict=True):
        if math.isfinite(value):
            calm = train <= factor * (train_best if untrained is None else untrained)
            run = run + 1 if value > factor * reference and not calm else 0
        train_best = min(train_best, train) if math.isfinite(train) else train_best
    if run < patience:
        return None
    return Verdict(
        "explosion",
        f"{curve.name} {values[-1]:.4g} > {factor:g} x reference {reference:.4g} for {run} "
        f"epochs at epoch {steps[-1]}",
        True,
    )


def stall(curve: Curve, *, epochs: int, tolerance: float, window: int) -> Verdict | None:
    """After `epochs` epochs, a positive loss is within `tolerance` of where it started (its
    first value, or the first `train_loss` if higher) and its last `window` values span less
    than `tolerance` of it."""
    steps, values = curve.finite()
    if not curve.positive or len(values) < window or steps[-1] < epochs:
        return None
    first_train = curve.extras["train_loss"][0]
    start = max(values[0], first_train if math.isfinite(first_train) else 0.0)
    recent = values[-window:]
    if start - min(values) >= tolerance * start or max(recent) - min(recent) >= tolerance * start:
        return None
    return Verdict(
        "stall",
        f"{curve.name} best {min(values):.4g} is within {tolerance:.0%} of its start "
        f"{start:.4g} after {steps[-1]} epochs",
        False,
    )


def check_ranges(**bounds: tuple[float, ...]) -> None:
    for name, (value, low, *high) in bounds.items():
        if not low <= value <= (high[0] if high else math.inf):
            limits = f"in [{low}, {high[0]}]" if high else f">= {low}"
            raise ValueError(f"{name} must be {limits}, but got {name}={value!r}")


def _given_back(values: list[float]) -> list[float]:
    """Per entry, the fraction it gives back of the fall from the highest value before the
    best so far to that best (> 1: above where the fall began); NaN where not finite."""
    peak, top, best, out = -math.inf, -math.inf, math.inf, []
    for value in values:
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        peak = max(peak, value)
        if value < best:
            top, best = peak, value
        out.append((value - best) / (top - best) if best < top else 0.0)
    return out


def _same(a: Any, b: float) -> bool:
    try:
        a = float(a)
    except (TypeError, ValueError):
        return False
    return a == b or (math.isnan(a) and math.isnan(b))
