"""The built-in trainer alone, without Optuna: metrics, NaN safety, determinism, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from search.checkpoint import Checkpoint
from search.exceptions import StopTrial
from search.trainable import load_dataset, lr_at, train

SMALL = {"lr": 0.01, "batch_size": 32, "depth": 1, "width": 16}
METRICS = {"val_loss", "val_accuracy", "train_loss", "lr", "grad_norm", "epoch_seconds"}


def _run(params: dict, **kwargs) -> list[tuple[int, dict]]:
    reports: list[tuple[int, dict]] = []
    train(params, "cpu", lambda step, m: reports.append((step, m)), dataset="wine", **kwargs)
    return reports


def test_one_epoch_reports_finite_metrics() -> None:
    reports = _run(SMALL, epochs=1)
    assert [step for step, _ in reports] == [1]
    metrics = reports[0][1]
    assert set(metrics) == METRICS
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["val_accuracy"] <= 1.0


def test_huge_learning_rate_gives_non_finite_loss_without_crash() -> None:
    reports = _run({**SMALL, "lr": 1e8, "optimizer": "sgd", "depth": 3, "width": 64}, epochs=8)
    last = reports[-1][1]
    assert not all(math.isfinite(last[k]) for k in ("val_loss", "train_loss", "grad_norm"))
    assert len(reports) < 8, "training stops once the weights are lost"


def test_training_is_deterministic_on_cpu() -> None:
    first = [m["val_loss"] for _, m in _run(SMALL, epochs=3)]
    second = [m["val_loss"] for _, m in _run(SMALL, epochs=3)]
    assert first == second


def test_training_learns_digits() -> None:
    reports: list[dict] = []
    train({"lr": 0.003, "batch_size": 64, "depth": 2, "width": 64}, "cpu",
          lambda step, m: reports.append(m), dataset="digits", epochs=8)
    assert reports[-1]["val_accuracy"] > 0.9


@pytest.mark.parametrize(
    ("schedule", "epoch", "expected"),
    [("constant", 9, 0.1), ("cosine", 0, 0.1), ("cosine", 5, 0.05), ("step", 4, 0.05)],
)
def test_lr_schedules(schedule: str, epoch: int, expected: float) -> None:
    assert lr_at(epoch, base_lr=0.1, epochs=10, schedule=schedule) == pytest.approx(expected)


def test_warmup_ramps_up_linearly() -> None:
    lrs = [lr_at(e, base_lr=0.1, epochs=10, warmup_epochs=3) for e in range(4)]
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1])


def test_stop_signal_from_report_propagates() -> None:
    def report(step: int, metrics: dict) -> None:
        raise StopTrial("enough")

    with pytest.raises(StopTrial):
        train(SMALL, "cpu", report, dataset="wine", epochs=5)


def test_resumes_from_checkpoint_after_the_saved_epoch(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "c.pt")
    steps: list[int] = []

    def stop_after_two(step: int, metrics: dict) -> None:
        steps.append(step)
        if step == 2:
            raise StopTrial("killed")

    with pytest.raises(StopTrial):
        train(SMALL, "cpu", stop_after_two, dataset="wine", epochs=4, checkpoint=checkpoint)
    resumed = _run(SMALL, epochs=4, checkpoint=checkpoint)
    assert [s for s, _ in resumed] == [3, 4]
    straight = _run(SMALL, epochs=4)
    assert resumed[-1][1]["val_loss"] == pytest.approx(straight[-1][1]["val_loss"], rel=1e-5)


def test_gradient_accumulation_keeps_the_effective_batch() -> None:
    plain = _run(SMALL, epochs=2)
    accumulated = _run(SMALL, epochs=2, accumulation_steps=4)
    assert accumulated[-1][1]["val_loss"] == pytest.approx(plain[-1][1]["val_loss"], rel=1e-3)


def test_datasets_are_standardized_with_a_fixed_split() -> None:
    x_train, _y_train, x_val, _ = load_dataset("breast_cancer")
    assert abs(float(x_train.mean())) < 1e-3
    assert len(x_val) == pytest.approx(0.2 * (len(x_train) + len(x_val)), abs=1)
    assert load_dataset("breast_cancer")[0] is x_train
