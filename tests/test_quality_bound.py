"""The time-to-quality bound (benchmarks/pruning/quality.py): a perfect-foresight pruner
charges one epoch to every trial that will not be the study's first of quality, the first
`startup` trials in full, and the winner only up to its best epoch."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "pruning"))
import quality
import replay

NAN = math.nan


def study(val: list[list[float]], accuracy: list[list[float]]) -> quality.Study:
    v, a = np.array(val), np.array(accuracy)
    pool = replay.Pool("hand", 2, v, v, np.ones_like(v), [{"lr": 0.1}] * len(v))
    return quality.Study(pool, a)


#: four 3-epoch trials; the third reaches 0.95 at its best epoch (2), the others stay at 0.8
FOUR = study(
    [[1.0, 0.9, 0.8], [1.0, NAN, NAN], [1.0, 0.5, 0.6], [0.9, 0.4, 0.3]],
    [[0.7, 0.8, 0.8], [0.7, NAN, NAN], [0.7, 0.95, 0.9], [0.8, 0.96, 0.97]],
)


@pytest.mark.parametrize(
    ("startup", "spent"),
    [
        (0, 1 + 1 + 2),  # two trials judged after one epoch each, the winner to its best
        (1, 3 + 1 + 2),  # the first runs in full
        (2, 3 + 2 + 2),  # the second went NaN at epoch 2: it ran 2 epochs, not 3
        (4, 3 + 2 + 2),  # an unjudged winner still ends at its best epoch
    ],
)
def test_the_oracle_charges_one_epoch_to_each_losing_trial_after_the_unjudged(
    startup: int, spent: int
) -> None:
    assert quality.oracle(FOUR, 0.9, startup) == spent


def test_a_trial_of_quality_that_is_not_the_studys_best_is_not_the_winner() -> None:
    # the second trial has the accuracy but a worse loss than the first trial's best
    val = [[0.5, 0.4, 0.3], [0.9, 0.8, 0.7], [0.2, 0.1, 0.1]]
    two = study(val, [[0.8] * 3, [0.99] * 3, [0.9] * 3])
    assert quality.oracle(two, 0.9, 1) == 3 + 1 + 2


def test_time_to_quality_counts_every_epoch_up_to_the_trial_that_reaches_it() -> None:
    assert quality.to_quality([15, 3, 15, 1], [0.8, 0.8, 0.95, 0.95], 0.9) == 33
    assert quality.to_quality([15, 3], [0.8, 0.8], 0.9) == 18  # never: the whole study


def test_the_oracle_that_kills_no_top_curve_runs_every_top_curve_before_the_winner() -> None:
    # the 4th trial is the best curve: kept, it still comes after the winner (the 3rd);
    # keeping the top 3 also runs the first trial (0.8) in full, not the NaN one
    assert quality.oracle(FOUR, 0.9, 0, keep=1) == 1 + 1 + 2
    assert quality.oracle(FOUR, 0.9, 0, keep=3) == 3 + 1 + 2


def test_an_unjudged_trial_is_charged_up_to_its_first_non_finite_metric_of_any_kind() -> None:
    # training goes NaN at epoch 2 (the trainer stops there), the recorded val_loss later
    val = np.array([[1.0, 0.9, NAN], [1.0, 0.5, 0.4]])
    train = np.array([[1.0, NAN, NAN], [1.0, 0.5, 0.4]])
    pool = replay.Pool("hand", 2, val, train, np.ones_like(val), [{"lr": 0.1}] * 2)
    accuracy = np.array([[0.5, 0.6, NAN], [0.5, 0.9, 0.95]])
    assert quality.oracle(quality.Study(pool, accuracy), 0.9, 1) == 2 + 3  # not 3 + 3
