"""Pruning: each rule fires at its epoch and not one earlier, leaves good runs alone, records
its reason and feasibility, stays cheap, and stops a real diverging training run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from conftest import REPO, base_spec
from optuna.trial import TrialState

from search.pruning import (
    DivergencePruner,
    TrendPruner,
    default_pruner,
    make_pruner,
)
from search.reporter import Reporter
from search.spec import spec_from_dict

NAN, INF = math.nan, math.inf
CURVES = REPO / "benchmarks" / "pruning" / "curves"


def study_with(pruner: optuna.pruners.BasePruner, **kwargs: Any) -> optuna.Study:
    return optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(0), **kwargs)


def run(
    study: optuna.Study,
    values: list[float],
    *,
    train: list[float] | None = None,
    grad: list[float] | None = None,
    metric: str = "val_loss",
) -> tuple[int | None, optuna.trial.FrozenTrial]:
    """Report `values` epoch by epoch as the worker's Reporter does; the epoch pruned at."""
    trial = study.ask()
    history: list[dict[str, float]] = []
    for epoch, value in enumerate(values, start=1):
        trial.report(value, epoch)
        row = {"epoch": epoch, metric: value}
        if train is not None:
            row["train_loss"] = train[epoch - 1]
        if grad is not None:
            row["grad_norm"] = grad[epoch - 1]
        history.append(row)
        trial.set_user_attr("epoch_metrics", history)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return epoch, study.trials[-1]
    finite = [v for v in values if math.isfinite(v)]
    study.tell(trial, min(finite) if finite else None)
    return None, study.trials[-1]


def own(**options: Any) -> optuna.Study:
    return study_with(DivergencePruner(None, **options))


FALLING = [2.0, 1.5, 1.2, 1.0, 0.9]


@pytest.mark.parametrize(
    ("values", "train", "grad", "where"),
    [
        ([*FALLING[:2], NAN], None, None, "val_loss is nan at epoch 3"),
        ([*FALLING[:2], INF], None, None, "val_loss is inf at epoch 3"),
        ([*FALLING[:2], -INF], None, None, "val_loss is -inf at epoch 3"),
        (FALLING[:3], [2.0, 1.5, NAN], None, "train_loss is nan at epoch 3"),
        (FALLING[:3], None, [1.0, 2.0, INF], "grad_norm is inf at epoch 3"),
    ],
)
def test_non_finite_prunes_at_that_epoch_as_infeasible(
    values: list[float], train: list[float] | None, grad: list[float] | None, where: str
) -> None:
    epoch, trial = run(own(rules=["non-finite"]), values, train=train, grad=grad)
    assert epoch == 3
    assert trial.user_attrs["prune_rule"] == "non-finite"
    assert trial.user_attrs["prune_reason"] == where
    assert trial.user_attrs["infeasible"] is True
    assert trial.constraints == {"diverged": 1.0}


def test_non_finite_prunes_a_maximized_metric_too() -> None:
    study = study_with(DivergencePruner(None), direction="maximize")
    assert run(study, [0.5, 0.7, NAN])[0] == 3


def test_divergence_fires_when_the_rebound_lasts_patience_epochs() -> None:
    values, train = [3.2, 1.8, 2.5, 2.6], [3.0, 1.6, 2.4, 2.5]
    assert run(own(rules=["divergence"]), values[:3], train=train[:3])[0] is None
    epoch, trial = run(own(rules=["divergence"]), values, train=train)
    assert epoch == 4
    assert trial.user_attrs["prune_rule"] == "divergence"
    assert trial.user_attrs["prune_reason"] == (
        "val_loss 2.6 gave back 57% of its fall from 3.2 to best 1.8 (> 40%, train_loss too) "
        "for 2 epochs at epoch 4"
    )
    assert trial.constraints == {"diverged": 1.0}


def test_divergence_leaves_overfitting_to_early_stopping() -> None:
    values = [1.0, 0.5, 0.3, 0.6, 0.7, 0.8, 0.9]
    train = [1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.05]
    assert run(own(), values, train=train)[0] is None


def test_divergence_without_train_loss_needs_a_bigger_longer_rebound() -> None:
    assert run(own(rules=["divergence"]), [3.2, 1.8, 2.5, 2.6])[0] is None
    values = [3.2, 1.8, 4.0, 4.2, 4.5]
    epoch, trial = run(own(rules=["divergence"]), values)
    assert epoch == 5
    assert "(> 150%)" in trial.user_attrs["prune_reason"]


def test_an_exploding_gradient_norm_is_divergence_while_the_loss_looks_fine() -> None:
    grad = [1.0, 1.2, 0.9, 1.1, 40.0]
    assert run(own(), FALLING[:4], grad=grad[:4])[0] is None
    epoch, trial = run(own(), FALLING, grad=grad)
    assert epoch == 5
    assert trial.user_attrs["prune_rule"] == "divergence"
    assert trial.user_attrs["prune_reason"].startswith("grad_norm 40 > 30 x the median 1.1")


def test_explosion_needs_two_epochs_far_above_the_first_value() -> None:
    assert run(own(rules=["explosion"]), [1.0, 3.5, 0.8, 0.7])[0] is None  # one spike
    epoch, trial = run(own(rules=["explosion"]), [1.0, 0.9, 3.5, 3.6])
    assert epoch == 4
    assert trial.user_attrs["prune_reason"] == (
        "val_loss 3.6 > 3 x reference 1 for 2 epochs at epoch 4"
    )
    assert trial.constraints == {"diverged": 1.0}


def test_explosion_needs_train_loss_to_explode_too_when_it_is_reported() -> None:
    values = [1.0, 0.9, 3.5, 3.6]
    assert run(own(rules=["explosion"]), values, train=[1.0, 0.8, 0.85, 0.9])[0] is None
    assert run(own(rules=["explosion"]), values, train=[1.0, 0.8, 3.0, 3.2])[0] == 4


def test_explosion_against_the_untrained_loss() -> None:
    epoch, _ = run(own(rules=["explosion"], untrained_loss=math.log(3)), [3.5, 3.6, 3.7])
    assert epoch == 2


def test_stall_fires_after_warm_up_and_is_feasible() -> None:
    values = [2.30 - 0.001 * i for i in range(12)]
    train = [2.31] * 12
    assert run(own(rules=["stall"]), values[:9], train=train[:9])[0] is None
    epoch, trial = run(own(rules=["stall"]), values, train=train)
    assert epoch == 10
    assert trial.user_attrs["prune_rule"] == "stall"
    assert trial.user_attrs["infeasible"] is False
    assert trial.constraints == {}


def test_stall_spares_a_run_that_learned_in_its_first_epoch() -> None:
    values = [0.10 - 0.0005 * i for i in range(15)]
    train = [0.9] + [0.1] * 14  # the first epoch's mean train loss shows how far it fell
    assert run(own(), values, train=train)[0] is None


def test_explosion_and_stall_never_fire_on_a_maximized_metric() -> None:
    study = study_with(DivergencePruner(None), direction="maximize")
    assert run(study, [0.5] * 15)[0] is None
    assert run(study, [0.1, 0.9, 0.9, 0.9])[0] is None


def test_early_oscillation_of_a_good_run_is_tolerated() -> None:
    values = [0.52, 0.51, 0.61, 0.25, 0.20, 0.31, 0.12, 0.10, 0.09, 0.08]
    train = [0.90, 0.55, 0.50, 0.35, 0.30, 0.28, 0.20, 0.15, 0.12, 0.10]
    assert run(study_with(default_pruner()), values, train=train)[0] is None


def _best_recorded_curves(n: int) -> list[tuple[str, np.ndarray]]:
    out = []
    for path in sorted(CURVES.glob("*.npz")):
        data = np.load(path)
        val = data["curves"][:, 0]
        best = np.where(np.isfinite(val), val, np.inf).min(axis=1)
        out += [(path.stem, data["curves"][i]) for i in np.argsort(best)[:n]]
    return out


def test_no_own_curve_rule_fires_on_the_best_recorded_real_curves() -> None:
    """The 5 best of each task in benchmarks/pruning/curves oscillate early; none is pruned."""
    study = own()
    for task, curve in _best_recorded_curves(5):
        values, train, grad = (curve[k].astype(float).tolist() for k in range(3))
        epoch, trial = run(study, values, train=train, grad=grad)
        assert epoch is None, (task, trial.user_attrs.get("prune_reason"))


def test_the_optuna_trial_sees_the_reason_at_once_and_the_reporter_keeps_it() -> None:
    study = study_with(DivergencePruner(None))
    trial = study.ask()
    spec = spec_from_dict(base_spec("x"))
    report = Reporter(trial, spec)
    report(1, {"val_loss": 1.0, "train_loss": 1.0, "grad_norm": 1.0})
    with pytest.raises(optuna.TrialPruned, match="val_loss is nan at epoch 2"):
        report(2, {"val_loss": NAN, "train_loss": NAN, "grad_norm": 1.0})
    assert trial.user_attrs["prune_rule"] == "non-finite"
    study.tell(trial, state=TrialState.PRUNED)
    assert study.trials[0].constraints == {"diverged": 1.0}


def test_infeasible_feedback_can_be_turned_off() -> None:
    _, trial = run(own(mark_infeasible=False), [1.0, NAN])
    assert trial.user_attrs["infeasible"] is True
    assert trial.constraints == {}


def _peers(study: optuna.Study, n: int) -> None:
    """Add `n` complete trials whose loss falls from 2.0 to 0.3-0.6 over 20 epochs."""
    trials = []
    for i in range(n):
        end = 0.3 * (1 + i / n)
        values = {e + 1: 2.0 * (end / 2.0) ** (e / 19) for e in range(20)}
        trials.append(optuna.trial.create_trial(value=end, intermediate_values=values))
    study.add_trials(trials)


def test_comparative_waits_for_enough_peers() -> None:
    study = study_with(default_pruner())
    _peers(study, 4)
    behind = [2.0 - 0.03 * e for e in range(20)]
    assert run(study, behind)[0] is None  # 4 complete < n_startup_trials
    assert run(study, behind)[0] == 5  # the 5th complete trial was the one above


def test_comparative_prunes_a_flat_trial_behind_many_peers_at_warm_up() -> None:
    study = study_with(default_pruner())
    _peers(study, 30)
    flat = [2.0, 1.9, 1.85, 1.8, 1.8, 1.8, 1.8]
    epoch, trial = run(study, flat, train=[1.0] * 7)
    assert epoch == 5
    assert trial.user_attrs["prune_rule"] == "comparative"
    assert trial.user_attrs["infeasible"] is False
    assert trial.constraints == {}
    reason = trial.user_attrs["prune_reason"]
    assert reason.startswith("val_loss best 1.8 at epoch 5 is behind the 50th percentile")
    assert "of 30 finished trials" in reason


def test_comparative_keeps_a_slow_starter_that_falls_fast() -> None:
    study = study_with(default_pruner())
    _peers(study, 30)
    slow = [2.0, 2.0, 1.9, 1.5, 1.1, 0.8, 0.6, 0.45, 0.34, 0.26, 0.2, 0.17, 0.15, 0.14]
    epoch, trial = run(study, slow, train=[1.0] * len(slow))
    assert epoch is None, trial.user_attrs.get("prune_reason")


def test_comparative_reads_a_maximized_metric_flipped() -> None:
    study = study_with(default_pruner(), direction="maximize")
    accuracy = [
        optuna.trial.create_trial(
            value=0.9 - 0.01 * i,
            intermediate_values={
                e + 1: (0.9 - 0.01 * i) * (1 - 0.7 ** (e + 1)) for e in range(20)
            },
        )
        for i in range(20)
    ]
    study.add_trials(accuracy)
    epoch, trial = run(study, [0.2, 0.25, 0.3, 0.3, 0.3, 0.3], metric="val_accuracy")
    assert epoch == 5
    reason = trial.user_attrs["prune_reason"]
    assert reason.startswith("val_accuracy best 0.3 at epoch 5 is behind the 50th percentile")
    rising = [0.1, 0.2, 0.35, 0.5, 0.62, 0.72, 0.8, 0.85, 0.88, 0.9]
    assert run(study, rising)[0] is None


def test_own_curve_decisions_make_no_query_for_other_trials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = study_with(DivergencePruner(TrendPruner(n_warmup_steps=5)))
    _peers(study, 10)
    trial = study.ask()

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the pruner read other trials")

    monkeypatch.setattr(study._storage, "get_all_trials", forbidden)
    history = []
    for epoch, (value, train) in enumerate([(3.2, 3.0), (1.8, 1.6), (2.5, 2.4)], start=1):
        trial.report(value, epoch)
        history.append({"epoch": epoch, "val_loss": value, "train_loss": train})
        trial.set_user_attr("epoch_metrics", history)
        assert not trial.should_prune()
    trial.report(2.6, 4)
    trial.set_user_attr(
        "epoch_metrics", [*history, {"epoch": 4, "val_loss": 2.6, "train_loss": 2.5}]
    )
    assert trial.should_prune()
    assert trial.user_attrs["prune_rule"] == "divergence"


def test_peers_are_read_once_per_refresh_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    study = study_with(TrendPruner(n_warmup_steps=1))
    _peers(study, 120)
    trial = study.ask()
    reads = []
    original = study._storage.get_all_trials
    monkeypatch.setattr(
        study._storage, "get_all_trials", lambda *a, **k: reads.append(1) or original(*a, **k)
    )
    for epoch in range(1, 10):
        trial.report(0.1, epoch)
        assert not trial.should_prune()
    assert len(reads) == 3  # 120 complete -> re-read after every 120 // 50 = 2 decisions


def test_a_real_training_run_with_a_huge_learning_rate_is_pruned_as_diverged() -> None:
    from search.trainable import train

    study = study_with(default_pruner())
    trial = study.ask()
    report = Reporter(trial, spec_from_dict(base_spec("x", epochs=6)))
    params = {"lr": 5.0, "batch_size": 16, "depth": 2, "width": 32, "optimizer": "sgd"}
    with pytest.raises(optuna.TrialPruned):
        train(params, "cpu", report, dataset="wine", epochs=6)
    assert trial.user_attrs["prune_rule"] in ("divergence", "non-finite")
    assert trial.user_attrs["infeasible"] is True
    study.tell(trial, state=TrialState.PRUNED)
    assert study.trials[0].constraints == {"diverged": 1.0}


@pytest.mark.postgres
def test_default_pruner_on_postgresql(pg_url: str, study_name: str) -> None:
    from search.storage import open_storage

    study = optuna.create_study(
        study_name=study_name, storage=open_storage(pg_url), pruner=default_pruner()
    )
    _peers(study, 6)
    assert run(study, [1.0, 0.5, NAN])[0] == 3
    assert run(study, [3.2, 1.8, 2.5, 2.6], train=[3.0, 1.6, 2.4, 2.5])[0] == 4
    assert run(study, [2.0, 1.95, 1.9, 1.9, 1.9, 1.9], train=[1.0] * 6)[0] == 5
    loaded = optuna.load_study(study_name=study_name, storage=open_storage(pg_url))
    pruned = [t for t in loaded.trials if t.state == TrialState.PRUNED]
    assert [t.user_attrs["prune_rule"] for t in pruned] == [
        "non-finite",
        "divergence",
        "comparative",
    ]
    assert [t.constraints for t in pruned] == [{"diverged": 1.0}, {"diverged": 1.0}, {}]
    assert all(t.user_attrs["prune_reason"] for t in pruned)


def test_default_pruner_is_divergence_around_trend() -> None:
    pruner = default_pruner()
    assert isinstance(pruner, DivergencePruner)
    assert isinstance(pruner.comparative, TrendPruner)


@pytest.mark.parametrize(
    ("name", "options", "kind"),
    [
        ("default", {}, DivergencePruner),
        ("default", {"divergence_margin": 0.5, "horizon": 5}, DivergencePruner),
        ("default", {"comparative": "median"}, DivergencePruner),
        ("trend", {"target_percentile": 20}, TrendPruner),
        ("none", {}, optuna.pruners.NopPruner),
        ("median", {"n_warmup_steps": 3}, optuna.pruners.MedianPruner),
        ("percentile", {"percentile": 25.0}, optuna.pruners.PercentilePruner),
        ("hyperband", {}, optuna.pruners.HyperbandPruner),
        ("successive_halving", {}, optuna.pruners.SuccessiveHalvingPruner),
        ("threshold", {"upper": 2.0}, optuna.pruners.ThresholdPruner),
        ("patient", {"patience": 3, "wrapped": "median"}, optuna.pruners.PatientPruner),
    ],
)
def test_make_pruner_builds_each_name(name: str, options: dict, kind: type) -> None:
    assert isinstance(make_pruner(name, options), kind)


def test_make_pruner_passes_thresholds_through() -> None:
    pruner = make_pruner("default", {"divergence_margin": 0.5, "horizon": 5, "rules": ["stall"]})
    assert isinstance(pruner, DivergencePruner) and isinstance(pruner.comparative, TrendPruner)
    assert (pruner.divergence_margin, pruner.comparative.horizon) == (0.5, 5)
    assert pruner.rules == ("stall",)
    bare = make_pruner("default", {"comparative": "none"})
    assert isinstance(bare, DivergencePruner) and bare.comparative is None


@pytest.mark.parametrize(
    ("pruning", "expected"),
    [
        ({"pruner": "oracle"}, "pruning: unknown pruner 'oracle'"),
        (
            {"divergence_margin": -1},
            "divergence_margin must be >= 0, but got divergence_margin=-1",
        ),
        ({"target_percentile": 150}, "target_percentile must be in [0, 100], but got"),
        ({"rules": ["nan"]}, "rules must be a list drawn from"),
        ({"stall_epoch": 3}, "pruner 'default': DivergencePruner.__init__() got an unexpected"),
        ({"comparative": "median", "horizon": 3}, "options ['horizon'] need comparative: trend"),
        ({"pruner": "median", "warmup": 3}, "pruner 'median': MedianPruner.__init__() got an"),
    ],
)
def test_bad_pruning_options_give_one_line_naming_the_option(
    write_spec: Any, pruning: dict, expected: str
) -> None:
    from search.exceptions import SpecError
    from search.spec import load_spec

    path: Path = write_spec(base_spec("bad", pruning=pruning))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: pruning: ")
    assert expected in message
    assert "\n" not in message
