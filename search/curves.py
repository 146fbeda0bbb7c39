"""A trial's own learning curve and the rules that read it, as pure functions.

Each rule takes a `Curve` (the trial's values flipped so lower is better, with `train_loss`,
`grad_norm` and `lr` where reported, and the trial's schedule) and returns a `Verdict` or
None. No rule queries the storage. A rule that needs the study's scale (a metric that is not
a positive loss, or a loss that starts near the study's best) takes it as an argument
(`Peers.spread`). See `search.pruning` for the rule table and the NaN/inf behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from search.record import epoch_rows

RULES = ("non-finite", "divergence", "explosion", "stall", "overfitting")
EXTRAS = ("train_loss", "grad_norm", "lr")
#: epochs after a warm-up or a learning-rate rise whose rises are not held against the trial
SETTLE_EPOCHS = 2
#: finite values needed to estimate a curve's noise
NOISE_VALUES = 6


@dataclass(frozen=True)
class Verdict:
    """Why a trial stops: the rule, a sentence with its numbers, and its feasibility.

    `end=False`: the trial is PRUNED (it never got good). `end=True`: "end, don't lose" — it
    reached a good value and then degraded, so it is recorded COMPLETE with its best value and
    best epoch (`Curve.best_epoch`), with the rule and reason stored.
    """

    rule: str
    reason: str
    infeasible: bool
    end: bool = False


@dataclass(frozen=True)
class Curve:
    """One trial's curve, flipped so that lower is better.

    `extras` holds `train_loss`, `grad_norm` and `lr` as reported (not flipped), NaN where
    not reported. `positive`: a minimized metric never below 0 (a loss).
    `warmup_epochs`: the trial's own warm-up (the built-in trainer's `warmup_epochs` param).
    """

    name: str
    steps: list[int]
    values: list[float]
    extras: dict[str, list[float]]
    positive: bool
    sign: float = 1.0
    warmup_epochs: int = 0

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping[str, Any]],
        *,
        metric: str,
        direction: StudyDirection,
        params: Mapping[str, Any] | None = None,
    ) -> Curve:
        """Build a curve from per-epoch rows (`{"epoch": 1, metric: ..., "train_loss": ...}`,
        oldest first; any subset of `EXTRAS` besides the metric), the study direction and the
        trial's params (`warmup_epochs` of the built-in trainer)."""
        steps = [int(r["epoch"]) for r in rows]
        raw = [_number(r.get(metric)) for r in rows]
        extras = {k: [_number(r.get(k)) for r in rows] for k in EXTRAS}
        sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
        positive = sign > 0 and all(v >= 0 for v in raw if math.isfinite(v))
        warmup = int(_number((params or {}).get("warmup_epochs", 0)) or 0)
        return cls(metric, steps, [sign * v for v in raw], extras, positive, sign, warmup)

    @classmethod
    def of(cls, trial: FrozenTrial, direction: StudyDirection) -> Curve:
        """Read the curve from the frozen trial alone (no storage query): its intermediate
        values, its `epoch_metrics` rows and its params."""
        rows = {int(r["epoch"]): r for r in epoch_rows(trial)}
        steps = sorted(trial.intermediate_values)
        last = rows.get(steps[-1], {}) if steps else {}
        value = trial.intermediate_values[steps[-1]] if steps else math.nan
        name = next((k for k, v in last.items() if k != "epoch" and _same(v, value)), "value")
        merged = [
            {**rows.get(s, {}), "epoch": s, name: trial.intermediate_values[s]} for s in steps
        ]
        return cls.from_rows(merged, metric=name, direction=direction, params=trial.params)

    @property
    def best_epoch(self) -> int | None:
        """The epoch of the best finite value (the first, on a tie)."""
        steps, values = self.finite()
        return steps[values.index(min(values))] if values else None

    def shown(self, value: float) -> str:
        """A flipped value as the trial reported it."""
        return f"{self.sign * value:.4g}"

    def reported(self, key: str) -> bool:
        return any(not math.isnan(v) for v in self.extras[key])

    def finite(self) -> tuple[list[int], list[float]]:
        return self.finite_from(0)

    def finite_from(self, index: int) -> tuple[list[int], list[float]]:
        """The finite values (and their steps) from entry `index` on."""
        pairs = zip(self.steps[index:], self.values[index:], strict=True)
        kept = [(s, v) for s, v in pairs if math.isfinite(v)]
        return [s for s, _ in kept], [v for _, v in kept]

    def settled(self, index: int) -> bool:
        """Whether entry `index` is `SETTLE_EPOCHS` past the warm-up (params) and past the
        last rise of the reported `lr` (a warm-up step or a restart)."""
        if self.steps[index] <= self.warmup_epochs + SETTLE_EPOCHS:
            return False
        since = range(max(0, index - SETTLE_EPOCHS), index + 1)
        return not any(self.lr_rose(back) for back in since)

    def lr_rose(self, index: int) -> bool:
        """Whether the reported `lr` rose (by more than 0.1%) at entry `index`."""
        lr = self.extras["lr"]
        return index > 0 and lr[index] > lr[index - 1] * 1.001

    @property
    def warmup(self) -> int:
        """The trial's learning-rate warm-up in epochs: its `warmup_epochs` param, or the
        epochs over which the reported `lr` first rose, whichever is longer."""
        rising = 0
        for i in range(1, len(self.steps)):
            if not self.lr_rose(i):
                break
            rising = self.steps[i]
        return max(self.warmup_epochs, rising)

    def segment_start(self) -> int:
        """The index where the current stretch of the schedule began: the first entry after
        the warm-up (params) and the last at which the reported `lr` rose (the end of its
        warm-up, a restart); 0 for a trial with neither. Clamped to the last entry: a trial
        still in its warm-up is at the start of its stretch."""
        start = sum(1 for step in self.steps if step <= self.warmup_epochs)
        for i in range(max(1, start), len(self.steps)):
            if self.lr_rose(i):
                start = i
        return min(start, max(0, len(self.steps) - 1))

    def noise(self, upto: int | None = None) -> float:
        """The curve's own epoch-to-epoch noise: half the median absolute second difference
        of its finite values (the first `upto + 1` of them; a straight fall has none); 0 with
        fewer than `NOISE_VALUES` values."""
        _, values = self.finite()
        return _jitter(values if upto is None else values[: upto + 1])


def non_finite(curve: Curve) -> Verdict | None:
    """NaN or +-inf in the metric, `train_loss` or `grad_norm` at any reported epoch."""
    for i, step in enumerate(curve.steps):
        checks = [(curve.name, curve.values[i])]
        checks += [(k, curve.extras[k][i]) for k in ("train_loss", "grad_norm")]
        for key, value in checks:
            counted = key == curve.name or curve.reported(key)
            if math.isinf(value) or (math.isnan(value) and counted):
                return Verdict("non-finite", f"{key} is {value} at epoch {step}", True)
    return None


def divergence(
    curve: Curve,
    *,
    margin: float,
    patience: int,
    min_fall: float,
    noise_factor: float,
    scale: float | None,
) -> Verdict | None:
    """The metric gave back more than `margin` of its fall (from the highest value before its
    best to that best) for `patience` settled epochs in a row, and `train_loss`, when
    reported, did too (overfitting raises only the metric: see `overfitting`).

    Guards: the fall must be at least `min_fall` x the curve's level (for a positive loss
    its highest value, or `scale`, the study's typical fall, when larger; else `scale` when
    known; else the size of its first value, once 6 values show its noise) and
    `noise_factor` x its own noise (measured on the values before the last `patience`, the
    rebound being judged); epochs in warm-up or right after a learning-rate rise
    (`Curve.settled`) do not count. Non-finite entries are skipped.
    """
    given = _given_back(curve.values)
    confirmed = curve.reported("train_loss")
    train = _given_back(curve.extras["train_loss"]) if confirmed else given
    run, peak, best, top, last = 0, -math.inf, math.inf, -math.inf, 0.0
    seen: list[float] = []
    for i, value in enumerate(curve.values):
        if not math.isfinite(value):
            continue
        seen.append(value)
        peak = max(peak, value)
        if value < best:
            top, best = peak, value
        noise = _jitter(seen[:-patience])  # the epochs before the rebound being judged
        fall = top - best
        large = fall > 0 and fall >= noise_factor * noise
        large = large and fall >= min_fall * _level(curve, top, scale, len(seen))
        rising = given[i] > margin and not train[i] <= margin
        run = run + 1 if large and rising and curve.settled(i) else 0
        last = given[i]
    if run < patience:
        return None
    steps, values = curve.finite()
    return Verdict(
        "divergence",
        f"{curve.name} {curve.shown(values[-1])} gave back {last:.0%} of its fall from "
        f"{curve.shown(top)} to best {curve.shown(best)} (> {margin:.0%}"
        f"{', train_loss too' if confirmed else ''}) for {run} epochs at epoch {steps[-1]}",
        True,
    )


def grad_explosion(curve: Curve, *, factor: float, patience: int) -> Verdict | None:
    """A finite `grad_norm` above `factor` x the median of the epochs before the spike began
    (2 or more), for `patience` epochs in a row: one outlier batch does not count."""
    norms = curve.extras["grad_norm"]
    if len(norms) < patience + 2 or not all(math.isfinite(n) for n in norms[-patience:]):
        return None
    earlier = sorted(n for n in norms[:-patience] if math.isfinite(n) and n > 0)
    if len(earlier) < 2:
        return None
    median = earlier[len(earlier) // 2]
    if not all(n > factor * median for n in norms[-patience:]):
        return None
    return Verdict(
        "divergence",
        f"grad_norm {norms[-1]:.4g} > {factor:g} x the median {median:.4g} of earlier epochs "
        f"for {patience} epochs at epoch {curve.steps[-1]}",
        True,
    )


def explosion(
    curve: Curve, *, factor: float, patience: int, untrained: float | None
) -> Verdict | None:
    """The metric is worse than its reference (`untrained` if given, else its first finite
    value; never if that is 0) by more than `factor - 1` x the reference's size, for
    `patience` epochs in a row — for a loss: above `factor` x the reference — with
    `train_loss` (if reported) above `factor` x `untrained` or x its best so far too: a
    validation spike on calm training is left alone. Any sign: the size is `|reference|`."""
    steps, values = curve.finite()
    if not values:
        return None
    reference = values[0] if untrained is None else curve.sign * untrained
    if reference == 0:
        return None
    bar = reference + (factor - 1) * abs(reference)
    run, train_best = 0, math.inf
    for value, train in zip(curve.values, curve.extras["train_loss"], strict=True):
        if math.isfinite(value):
            calm = train <= factor * (train_best if untrained is None else untrained)
            run = run + 1 if value > bar and not calm else 0
        train_best = min(train_best, train) if math.isfinite(train) else train_best
    if run < patience:
        return None
    return Verdict(
        "explosion",
        f"{curve.name} {curve.shown(values[-1])} is past {curve.shown(bar)} ({factor:g} x "
        f"reference {curve.shown(reference)}) for {run} epochs at epoch {steps[-1]}",
        True,
    )


def stall(
    curve: Curve, *, epochs: int, tolerance: float, window: int, scale: float | None
) -> Verdict | None:
    """After `epochs` epochs (and past its warm-up), the metric is within `tolerance` x its
    size of where it started (its first value, or the first `train_loss` if higher, for a
    loss) and its last `window` values span less than that too. The size is the start itself
    for a positive loss, else `scale` (the study's spread) when known, else `|start|`."""
    steps, values = curve.finite()
    if len(values) < window or steps[-1] < max(epochs, curve.warmup_epochs + window):
        return None
    first_train = curve.extras["train_loss"][0] if curve.positive else math.nan
    start = max(values[0], first_train if math.isfinite(first_train) else -math.inf)
    size = start if curve.positive else (scale if scale is not None else abs(values[0]))
    if not size > 0:
        return None
    recent = values[-window:]
    if start - min(values) >= tolerance * size or max(recent) - min(recent) >= tolerance * size:
        return None
    return Verdict(
        "stall",
        f"{curve.name} best {curve.shown(min(values))} is within {tolerance:.0%} of "
        f"{size:.4g} of its start {curve.shown(start)} after {steps[-1]} epochs",
        False,
    )


def overfitting(
    curve: Curve,
    *,
    margin: float,
    patience: int,
    noise_factor: float,
    min_fall: float,
    scale: float | None,
) -> Verdict | None:
    """No new best for `patience` epochs, every one of them worse than the best by more than
    `margin` of its fall and by `noise_factor` x the curve's noise (all its values), and the
    last the worst so far after the best (never before `patience + 5` values); the fall
    must be large, as for `divergence` (`min_fall`, `scale`); with
    `train_loss` reported it must have fallen since the best epoch by more than `margin` of
    its value there (overfitting is training that still improves while validation gets
    worse; with both flat or worse it is a noisy plateau or a rebound, not overfitting).
    Feasible: the trial got somewhere, it is ended at its best (see `search.pruning`)."""
    steps, values = curve.finite()
    if len(values) < patience + NOISE_VALUES - 1:
        return None
    best_at = values.index(min(values))
    if len(values) - 1 - best_at < patience or not curve.settled(len(curve.values) - 1):
        return None
    best, top = values[best_at], max(values[: best_at + 1])
    fall = top - best
    if fall <= 0 or fall < min_fall * _level(curve, top, scale, len(values)):
        return None
    bar = best + max(margin * fall, noise_factor * curve.noise())
    tail = values[-patience:]
    if min(tail) <= bar or tail[-1] < max(values[best_at + 1 :]):
        return None
    train = curve.extras["train_loss"]
    then, now = train[curve.steps.index(steps[best_at])], train[-1]
    if math.isfinite(then) and math.isfinite(now) and now > then - margin * abs(then):
        return None  # training did not get better either: a plateau, not overfitting
    return Verdict(
        "overfitting",
        f"{curve.name} {curve.shown(values[-1])} has been worse than its best "
        f"{curve.shown(best)} (epoch {steps[best_at]}) by more than {margin:.0%} of its fall "
        f"for {patience} epochs at epoch {steps[-1]}",
        False,
    )


def check_ranges(**bounds: tuple[float, ...]) -> None:
    for name, (value, low, *high) in bounds.items():
        if not low <= value <= (high[0] if high else math.inf):
            limits = f"in [{low}, {high[0]}]" if high else f">= {low}"
            raise ValueError(f"{name} must be {limits}, but got {name}={value!r}")


def _jitter(values: list[float]) -> float:
    if len(values) < NOISE_VALUES:
        return 0.0
    triples = zip(values, values[1:], values[2:], strict=False)
    second = sorted(abs(a - 2 * b + c) for a, b, c in triples)
    return second[len(second) // 2] / 2


def _level(curve: Curve, top: float, scale: float | None, seen: int) -> float:
    """What a fall is measured against: a positive loss's own height `top`, or the study's
    `scale` when larger (a trial that starts near the study's best falls little, and a
    wiggle there is not a rebound); else the study's `scale`; else (no peers) the size of
    the first value, once the noise is known (`inf` before: no fall is large yet)."""
    if curve.positive:
        return max(abs(top), scale) if scale is not None else abs(top)
    if scale is not None:
        return scale
    finite = [v for v in curve.values if math.isfinite(v)]
    return abs(finite[0]) if seen >= NOISE_VALUES else math.inf


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


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _same(a: Any, b: float) -> bool:
    a = _number(a)
    return a == b or (math.isnan(a) and math.isnan(b))
