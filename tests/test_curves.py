"""The own-curve rules of `search.curves`, each pinned by a few hand-written values: what a
warm-up, a restart, noise, an outlier batch, a too-small learning rate and an overfitting run
look like, and that none of them is called divergence."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from optuna.study import StudyDirection

from search.curves import (
    Curve,
    divergence,
    explosion,
    grad_explosion,
    non_finite,
    overfitting,
    stall,
)
from search.record import EPOCH_METRICS

MIN = StudyDirection.MINIMIZE
NAN = math.nan


def curve(
    values: list[float],
    *,
    train: list[float] | None = None,
    grad: list[float] | None = None,
    lr: list[float] | None = None,
    params: dict[str, Any] | None = None,
    direction: StudyDirection = MIN,
    metric: str = "val_loss",
) -> Curve:
    rows = []
    for i, value in enumerate(values):
        row: dict[str, float] = {"epoch": i + 1, metric: value}
        for key, column in (("train_loss", train), ("grad_norm", grad), ("lr", lr)):
            if column is not None:
                row[key] = column[i]
        rows.append(row)
    return Curve.from_rows(rows, metric=metric, direction=direction, params=params)


def diverged(c: Curve, *, scale: float | None = None) -> bool:
    found = divergence(c, margin=0.4, patience=2, min_fall=0.1, noise_factor=3.0, scale=scale)
    return found is not None


def first_divergence(values: list[float], **kwargs: Any) -> int | None:
    """The first epoch at which the divergence rule fires on the curve so far."""
    for n in range(1, len(values) + 1):
        cut = {k: v[:n] for k, v in kwargs.items() if isinstance(v, list)}
        rest = {k: v for k, v in kwargs.items() if not isinstance(v, list)}
        if diverged(curve(values[:n], **cut, **rest)):
            return n
    return None


def test_from_rows_flips_a_maximized_metric_and_reads_the_warm_up_from_params() -> None:
    rows = [{"epoch": 1, "acc": 0.5, "lr": 0.1}, {"epoch": 2, "acc": 0.7, "train_loss": 1.0}]
    c = Curve.from_rows(
        rows, metric="acc", direction=StudyDirection.MAXIMIZE, params={"warmup_epochs": 3}
    )
    assert (c.name, c.steps, c.values, c.sign) == ("acc", [1, 2], [-0.5, -0.7], -1.0)
    assert c.extras["lr"][0] == 0.1 and math.isnan(c.extras["lr"][1])
    assert math.isnan(c.extras["train_loss"][0]) and c.extras["train_loss"][1] == 1.0
    assert c.warmup_epochs == 3 and c.best_epoch == 2 and c.shown(-0.7) == "0.7"


def test_of_a_frozen_trial_is_from_rows_of_its_epoch_metrics() -> None:
    study = optuna.create_study()
    trial = study.ask({"warmup_epochs": optuna.distributions.IntDistribution(0, 5)})
    rows = [
        {"epoch": 1, "val_loss": 2.0, "train_loss": 2.1, "lr": 0.01},
        {"epoch": 2, "val_loss": 1.5, "train_loss": 1.6, "lr": 0.02},
    ]
    for row in rows:
        trial.report(row["val_loss"], int(row["epoch"]))
    trial.set_user_attr(EPOCH_METRICS, rows)
    study.tell(trial, 1.5)
    frozen = study.trials[0]
    built = Curve.from_rows(rows, metric="val_loss", direction=MIN, params=frozen.params)
    assert Curve.of(frozen, MIN) == built


def test_a_dip_then_a_small_rise_in_warm_up_is_not_divergence() -> None:
    """Issue 11: `val 2.0, 1.94, 1.97, 1.98` with `train 2.1, 2.03, 2.06, 2.08` (a 1.5% rise
    after a 3% dip) was pruned at epoch 4; the fall is too small against the level."""
    c = curve([2.0, 1.94, 1.97, 1.98], train=[2.1, 2.03, 2.06, 2.08])
    assert not diverged(c)


REBOUND = [3.2, 1.8, 2.5, 2.6, 2.7]
REBOUND_TRAIN = [3.0, 1.6, 2.4, 2.5, 2.6]


def test_the_rebound_is_divergence_at_its_second_epoch_with_or_without_train_loss() -> None:
    assert first_divergence(REBOUND, train=REBOUND_TRAIN) == 4
    assert first_divergence(REBOUND) == 4
    verdict = divergence(
        curve(REBOUND[:4], train=REBOUND_TRAIN[:4]),
        margin=0.4,
        patience=2,
        min_fall=0.1,
        noise_factor=3.0,
        scale=None,
    )
    assert verdict is not None and verdict.infeasible
    assert verdict.reason == (
        "val_loss 2.6 gave back 57% of its fall from 3.2 to best 1.8 (> 40%, train_loss too) "
        "for 2 epochs at epoch 4"
    )


def test_a_rise_during_the_trials_own_warm_up_is_not_divergence() -> None:
    warm = {"warmup_epochs": 3}
    assert first_divergence(REBOUND, train=REBOUND_TRAIN, params=warm) is None
    # the same rise after the warm-up (and 2 settling epochs) counts again
    late = [3.2, 3.0, 2.5, 2.0, 1.8, 2.5, 2.6, 2.7]
    assert first_divergence(late, params=warm) == 7


def test_a_rise_while_the_reported_lr_warms_up_or_restarts_is_not_divergence() -> None:
    assert first_divergence(REBOUND, lr=[0.1, 0.2, 0.3, 0.4, 0.5]) is None
    restart = [3.2, 2.0, 1.5, 1.2, 1.0, 2.0, 2.2, 1.1, 0.9]
    sgdr = [1.0, 0.7, 0.4, 0.2, 0.05, 1.0, 0.7, 0.4, 0.2]
    assert first_divergence(restart, lr=sgdr) is None
    assert first_divergence(restart) == 7  # without the lr it would be


def test_a_fall_within_the_curves_own_noise_is_not_given_back() -> None:
    noisy = [1.3, 1.0, 0.7, 1.2, 0.7, 1.2, 0.7, 1.25, 1.2]
    assert first_divergence(noisy) is None
    assert first_divergence([1.3, 1.0, 0.7, 0.7, 0.7, 0.7, 0.7, 1.25, 1.2]) == 9


def test_a_loss_that_starts_near_the_studys_best_needs_a_fall_the_size_of_the_studys() -> None:
    """Metric-only, a trial that starts near the study's best wiggles 0.114 -> 0.095 ->
    0.116: on its own height that is a 17 % fall given back, a rebound; against a study whose
    trials fall 0.4 it is noise. The canonical rebound is caught either way."""
    wiggle = [0.114, 0.107, 0.095, 0.099, 0.116, 0.116]
    assert diverged(curve(wiggle))
    assert not diverged(curve(wiggle), scale=0.4)
    assert diverged(curve([3.2, 1.8, 2.5, 2.6]), scale=0.4)


def test_a_flat_run_is_a_stall_never_divergence() -> None:
    """A too-small learning rate: the loss jitters around where it started."""
    flat = [2.303, 2.301, 2.305, 2.302, 2.306, 2.303, 2.307, 2.302, 2.304, 2.303, 2.305, 2.304]
    assert first_divergence(flat, train=[v + 0.01 for v in flat]) is None
    verdict = stall(curve(flat), epochs=10, tolerance=0.05, window=5, scale=None)
    assert verdict is not None and verdict.rule == "stall" and not verdict.infeasible


def test_an_accuracy_stuck_at_chance_is_a_stall_never_divergence() -> None:
    chance = [0.1, 0.12, 0.09, 0.1, 0.13, 0.1, 0.11, 0.09, 0.1, 0.12, 0.1]
    c = curve(chance, direction=StudyDirection.MAXIMIZE, metric="val_accuracy")
    for spread in (None, 0.8):
        assert not diverged(c, scale=spread)
    verdict = stall(c, epochs=10, tolerance=0.05, window=5, scale=0.8)
    assert verdict is not None and verdict.reason.startswith("val_accuracy best 0.13 is within")


def test_a_negative_metric_can_stall_and_explode() -> None:
    flat = [-2.7 + 0.001 * (i % 3) for i in range(12)]
    assert stall(curve(flat), epochs=10, tolerance=0.05, window=5, scale=None) is not None
    exploding = [-2.7, -3.0, 3.0, 4.0]
    found = explosion(curve(exploding), factor=3.0, patience=2, untrained=None)
    assert found is not None and found.reason.startswith("val_loss 4 is past 2.7")


def test_one_outlier_batch_in_grad_norm_is_not_divergence_a_lasting_spike_is() -> None:
    """Issue 11: `grad_norm 19.7 > 30 x the median 0.4777` from one small-batch outlier."""
    spike = [0.5, 0.45, 0.48, 19.7]
    assert grad_explosion(curve([1.0] * 4, grad=spike), factor=30, patience=2) is None
    assert grad_explosion(curve([1.0] * 5, grad=[*spike, 0.5]), factor=30, patience=2) is None
    lasting = [0.5, 0.45, 0.48, 19.7, 25.0]
    found = grad_explosion(curve([1.0] * 5, grad=lasting), factor=30, patience=2)
    assert found is not None and "for 2 epochs at epoch 5" in found.reason


OVERFIT = [1.0, 0.5, 0.3, 0.2, 0.17, 0.168, 0.19, 0.23, 0.28, 0.33, 0.4077]
OVERFIT_TRAIN = [1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04]


def test_overfitting_is_seen_after_patience_epochs_without_a_best_and_is_feasible() -> None:
    def at(n: int) -> Any:
        c = curve(OVERFIT[:n], train=OVERFIT_TRAIN[:n])
        return overfitting(c, margin=0.05, patience=3, noise_factor=3.0, min_fall=0.1, scale=None)

    assert next(n for n in range(1, 12) if at(n) is not None) == 10
    verdict = at(10)
    assert not verdict.infeasible
    assert verdict.reason.startswith("val_loss 0.33 has been worse than its best 0.168 (epoch 6)")
    assert not diverged(curve(OVERFIT, train=OVERFIT_TRAIN))  # train_loss keeps falling


def test_overfitting_leaves_a_run_whose_train_loss_rises_too_to_divergence() -> None:
    c = curve(OVERFIT, train=[*OVERFIT_TRAIN[:6], 0.2, 0.3, 0.4, 0.5, 0.6])
    assert (
        overfitting(c, margin=0.05, patience=3, noise_factor=3.0, min_fall=0.1, scale=None) is None
    )


def test_overfitting_is_not_called_when_training_got_worse_since_the_best_epoch() -> None:
    """A real digits curve (adam, cosine): val rises while train_loss climbs 0.035 -> 0.044
    after the val best; it came back to a better best later. Train's own range (0.59 at
    epoch 1) used to hide that rise."""
    val = [0.5, 0.202, 0.119, 0.0903, 0.105, 0.1029, 0.1091, 0.1494, 0.1127, 0.1612, 0.197]
    train = [0.5922, 0.1126, 0.0704, 0.0353, 0.0311, 0.0205, 0.015, 0.0218, 0.0243, 0.0549, 0.0437]
    c = curve(val, train=train)
    assert (
        overfitting(c, margin=0.05, patience=2, noise_factor=3.0, min_fall=0.1, scale=None) is None
    )
    kept = curve(val, train=[*train[:8], 0.014, 0.013, 0.012])  # training kept improving
    assert overfitting(kept, margin=0.05, patience=2, noise_factor=3.0, min_fall=0.1, scale=None)


def test_a_noisy_plateau_whose_training_loss_is_flat_too_is_not_overfitting() -> None:
    """A real curve (synthetic6, adam, batch 256; the best of its study, 0.730 at epoch 34)
    was ended at epoch 19 at 0.766: val 3 epochs above its best while train_loss moved
    0.820 -> 0.805 (2 %). Overfitting is training that still improves."""
    val = [1.271, 1.069, 1.012, 0.945, 0.914, 0.885, 0.852, 0.821, 0.812, 0.802, 0.807, 0.771]
    val += [0.786, 0.794, 0.784, 0.766, 0.796, 0.8, 0.811]
    train = [1.646, 1.346, 1.174, 1.101, 1.018, 1.001, 0.964, 0.939, 0.901, 0.904, 0.897, 0.851]
    train += [0.837, 0.836, 0.859, 0.82, 0.856, 0.784, 0.805]
    options: dict[str, Any] = {"margin": 0.05, "noise_factor": 3.0, "min_fall": 0.1}
    assert overfitting(curve(val, train=train), patience=3, scale=None, **options) is None
    falling = curve(val, train=[*train[:-1], 0.7])  # 15 % below train at the val best
    assert overfitting(falling, patience=3, scale=None, **options) is not None


def test_the_warm_up_and_restarts_come_from_params_or_the_reported_lr() -> None:
    values = [2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4]
    assert curve(values, params={"warmup_epochs": 3}).warmup == 3
    assert curve(values, lr=[0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3]).warmup == 3
    assert curve(values, params={"warmup_epochs": 3}).segment_start() == 3
    restart = [0.3, 0.2, 0.1, 0.3, 0.2, 0.1, 0.05]
    assert curve(values, lr=restart).segment_start() == 3 and curve(values).segment_start() == 0


@pytest.mark.parametrize(
    ("values", "train", "grad", "where"),
    [
        ([2.0, 1.5, NAN], None, None, "val_loss is nan at epoch 3"),
        ([2.0, 1.5, math.inf], None, None, "val_loss is inf at epoch 3"),
        ([2.0, 1.5, 1.2], [2.0, 1.5, NAN], None, "train_loss is nan at epoch 3"),
        ([2.0, 1.5, 1.2], None, [1.0, 2.0, math.inf], "grad_norm is inf at epoch 3"),
    ],
)
def test_non_finite_names_the_first_bad_value(
    values: list[float], train: list[float] | None, grad: list[float] | None, where: str
) -> None:
    verdict = non_finite(curve(values, train=train, grad=grad))
    assert verdict is not None and verdict.reason == where and verdict.infeasible
    assert non_finite(curve(values[:2])) is None
