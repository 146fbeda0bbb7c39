"""Pruning: each rule fires at its epoch and not one earlier, leaves good runs alone, records
its reason and feasibility, stays cheap, and stops a real diverging training run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from conftest import REPO, base_spec, survivors_and_pruned
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from search.pruning import (
    Curve,
    DivergencePruner,
    Peers,
    TrendPruner,
    Verdict,
    default_pruner,
    make_pruner,
)
from search.record import INFEASIBLE, PRUNE_REASON, PRUNE_RULE
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


def judge_each_epoch(
    pruner: DivergencePruner,
    values: list[float],
    *,
    train: list[float] | None = None,
    peers: Peers | None = None,
    direction: StudyDirection = StudyDirection.MINIMIZE,
    params: dict[str, Any] | None = None,
) -> tuple[int | None, Verdict | None]:
    """Ask `judge` after each epoch on `Curve.from_rows`, as the worker's Reporter does."""
    rows: list[dict[str, float]] = []
    for epoch, value in enumerate(values, start=1):
        row = {"epoch": epoch, "val_loss": value}
        if train is not None:
            row["train_loss"] = train[epoch - 1]
        rows.append(row)
        curve = Curve.from_rows(rows, metric="val_loss", direction=direction, params=params)
        verdict = pruner.judge(curve, peers)
        if verdict is not None:
            return epoch, verdict
    return None, None


def complete_peers(n: int, *, scale: float = 1.0, shift: float = 0.0) -> Peers:
    """`n` complete trials falling from 2.0 to 0.3-0.6 over 25 epochs (long enough for the
    comparison's full 5-epoch warm-up)."""
    peers = Peers(StudyDirection.MINIMIZE)
    trials = []
    for i in range(n):
        end = 0.3 * (1 + i / n)
        values = {e + 1: 2.0 * (end / 2.0) ** (e / 24) * scale + shift for e in range(25)}
        trials.append(create_trial(value=end * scale + shift, intermediate_values=values))
        trials[-1].number = i
    peers.add(trials)
    return peers


REBOUND, REBOUND_TRAIN = [3.2, 1.8, 2.5, 2.6], [3.0, 1.6, 2.4, 2.5]


@pytest.mark.parametrize("train", [REBOUND_TRAIN, None], ids=["full", "metric-only"])
def test_the_rebound_is_caught_at_its_second_epoch_in_both_reporting_modes(
    train: list[float] | None,
) -> None:
    """Issue 11: `3.2 -> 1.8 -> 2.5 and climbing` was never caught without train_loss."""
    epoch, verdict = judge_each_epoch(DivergencePruner(None), REBOUND, train=train)
    assert epoch == 4 and verdict is not None and verdict.rule == "divergence"


def test_a_rebound_that_never_got_good_is_pruned_as_infeasible() -> None:
    """Against peers that all reach 0.3-0.6, a best of 1.8 is not good: PRUNED."""
    epoch, verdict = judge_each_epoch(
        DivergencePruner(None), REBOUND, train=REBOUND_TRAIN, peers=complete_peers(10)
    )
    assert epoch == 4 and verdict == Verdict(
        "divergence",
        "val_loss 2.6 gave back 57% of its fall from 3.2 to best 1.8 (> 40%, train_loss too) "
        "for 2 epochs at epoch 4",
        True,
        end=False,
    )


def test_a_rebound_after_a_good_best_ends_the_trial_at_its_best() -> None:
    late = [2.0, 1.2, 0.6, 0.25, 1.2, 1.3]
    epoch, verdict = judge_each_epoch(
        DivergencePruner(None), late, train=late, peers=complete_peers(10)
    )
    assert epoch == 6 and verdict is not None and verdict.end and not verdict.infeasible
    assert verdict.reason.endswith("; ended at its best 0.25 (epoch 4)")


def survivor_peers() -> Peers:
    """The peers of `conftest.survivors_and_pruned`: 5 survivors, 10 pruned early."""
    peers = Peers(StudyDirection.MINIMIZE)
    peers.add(survivors_and_pruned())
    return peers


def test_good_is_ranked_among_every_finished_trial_not_the_survivors() -> None:
    """A rebound from 0.5, better than 10 of the 15 finished trials but behind the 5 complete
    survivors, was pruned as infeasible (TPE learnt "diverged" for it): now it is ended."""
    peers = survivor_peers()
    assert peers.final(50) < 0.5 < peers.rank(50)
    late = [2.0, 1.2, 0.5, 1.2, 1.3]
    epoch, verdict = judge_each_epoch(DivergencePruner(None), late, train=late, peers=peers)
    assert epoch == 5 and verdict is not None and verdict.rule == "divergence"
    assert verdict.end and not verdict.infeasible
    assert verdict.reason.endswith("ended at its best 0.5 (epoch 3)")


def test_a_comparative_stop_ends_a_good_trial_past_its_best_and_prunes_one_still_improving() -> (
    None
):
    """Behind its peers either way; a trial whose best is 3+ epochs old has its result, one
    still improving does not (PRUNED: its value is unfinished)."""
    peers = survivor_peers()
    plateau = [2.0, 1.6, 1.3, 1.2, 1.15, 1.15, 1.16, 1.15, 1.16, 1.17, 1.16, 1.17]
    epoch, verdict = judge_each_epoch(default_pruner(), plateau, peers=peers)
    assert epoch == 9 and verdict is not None and verdict.rule == "comparative"
    assert verdict.end and verdict.reason.endswith("ended at its best 1.15 (epoch 5)")
    improving = [2.0, 1.9, 1.85, 1.8, 1.78, 1.76, 1.74, 1.72]
    epoch, verdict = judge_each_epoch(default_pruner(), improving, peers=peers)
    assert epoch == 5 and verdict is not None and verdict.rule == "comparative"
    assert not verdict.end and not verdict.infeasible


def test_an_overfitting_run_ends_complete_at_its_best_instead_of_losing_it() -> None:
    """Issue 11: a trial with best 0.168 was stored PRUNED at 0.4077 and left out of
    best_value. Now it ends at epoch 10 with its best 0.168 (epoch 6), feasible."""
    values = [1.0, 0.5, 0.3, 0.2, 0.17, 0.168, 0.19, 0.23, 0.28, 0.33, 0.4077]
    train = [1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04]
    for mode_train in (train, None):
        epoch, verdict = judge_each_epoch(
            default_pruner(), values, train=mode_train, peers=complete_peers(10)
        )
        assert epoch == 10 and verdict is not None
        assert (verdict.rule, verdict.end, verdict.infeasible) == ("overfitting", True, False)
        assert verdict.reason.endswith("ended at its best 0.168 (epoch 6)")


def test_a_dip_then_a_small_rise_in_warm_up_is_never_stopped() -> None:
    """Issue 11's minimal case, pruned at epoch 4 before."""
    values, train = [2.0, 1.94, 1.97, 1.98], [2.1, 2.03, 2.06, 2.08]
    for mode_train in (train, None):
        assert judge_each_epoch(default_pruner(), values, train=mode_train)[0] is None


def test_a_rise_during_the_trials_warm_up_is_not_divergence() -> None:
    warm = {"warmup_epochs": 3}
    assert judge_each_epoch(DivergencePruner(None), REBOUND, params=warm)[0] is None


def test_non_finite_before_any_good_value_is_pruned_after_one_ends_the_trial() -> None:
    epoch, verdict = judge_each_epoch(DivergencePruner(None), [2.0, NAN])
    assert epoch == 2 and verdict is not None and not verdict.end and verdict.infeasible
    epoch, verdict = judge_each_epoch(
        DivergencePruner(None), [2.0, 1.0, 0.2, NAN], peers=complete_peers(10)
    )
    assert epoch == 4 and verdict is not None and verdict.end
    assert verdict.reason == "val_loss is nan at epoch 4; ended at its best 0.2 (epoch 3)"


FLAT = [2.303, 2.301, 2.305, 2.302, 2.306, 2.303, 2.307, 2.302, 2.304, 2.303, 2.305, 2.304]
OVERFIT = [1.0, 0.5, 0.3, 0.2, 0.17, 0.168, 0.19, 0.23, 0.28, 0.33, 0.4077]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (REBOUND, (4, "divergence", False)),  # best 1.8: behind every peer, pruned
        ([2.0, 1.5, NAN], (3, "non-finite", False)),
        ([1.0, 0.95, 3.5, 3.6], (4, "explosion", False)),
        (FLAT, (5, "comparative", False)),
        (OVERFIT, (10, "overfitting", True)),  # best 0.168: good, ended at its best
    ],
)
def test_the_same_decision_at_any_scale_and_sign(values: list[float], expected: tuple) -> None:
    """x1e-4, x1e4 and a shift below zero (a negative loss) decide alike."""
    for scale, shift in ((1.0, 0.0), (1e-4, 0.0), (1e4, 0.0), (1.0, -5.0)):
        moved = [v * scale + shift for v in values]
        peers = complete_peers(10, scale=scale, shift=shift)
        epoch, verdict = judge_each_epoch(default_pruner(), moved, peers=peers)
        if shift and expected[1] == "explosion":
            continue  # "3 x its first value" means nothing once shifted: see test below
        assert verdict is not None, (scale, shift)
        assert (epoch, verdict.rule, verdict.end) == expected, (scale, shift)


def test_a_negative_loss_explodes_past_its_size_and_stalls() -> None:
    exploding = [-2.7, -3.0, 3.0, 4.0]
    epoch, verdict = judge_each_epoch(DivergencePruner(None, rules=["explosion"]), exploding)
    assert (epoch, verdict.rule) == (4, "explosion")
    epoch, verdict = judge_each_epoch(DivergencePruner(None), [v - 5 for v in FLAT])
    assert (epoch, verdict.rule) == (10, "stall")


def test_a_maximized_accuracy_at_chance_stalls_and_a_collapse_is_caught() -> None:
    maximize = StudyDirection.MAXIMIZE
    peers = Peers(maximize)
    trials = [
        create_trial(
            value=a, intermediate_values={e + 1: a * (1 - 0.6 ** (e + 1)) for e in range(15)}
        )
        for a in (0.9, 0.92, 0.94, 0.95, 0.96, 0.97)
    ]
    for number, trial in enumerate(trials):
        trial.number = number
    peers.add(trials)
    chance = [0.1, 0.11, 0.09, 0.1, 0.115, 0.1, 0.105, 0.095, 0.1, 0.11, 0.1]
    epoch, verdict = judge_each_epoch(
        DivergencePruner(None), chance, peers=peers, direction=maximize
    )
    assert (epoch, verdict.rule, verdict.infeasible) == (10, "stall", False)
    collapse = [0.3, 0.6, 0.8, 0.9, 0.1, 0.1]
    epoch, verdict = judge_each_epoch(
        DivergencePruner(None), collapse, peers=peers, direction=maximize
    )
    assert (epoch, verdict.rule, verdict.end) == (6, "divergence", False)


def test_through_prune_a_verdict_is_recorded_with_the_record_keys() -> None:
    study = study_with(DivergencePruner(None))
    epoch, trial = run(study, REBOUND, train=REBOUND_TRAIN)
    assert epoch == 4
    assert trial.user_attrs[PRUNE_RULE] == "divergence"
    assert trial.user_attrs[PRUNE_REASON].startswith("val_loss 2.6 gave back 57%")
    assert trial.user_attrs[INFEASIBLE] is False  # no peers: it fell, so it ended at its best
    _, nan_trial = run(study, [2.0, NAN])
    assert nan_trial.user_attrs[INFEASIBLE] is True
    assert nan_trial.constraints == {"diverged": 1.0}


def test_an_exploding_gradient_norm_is_divergence_only_when_it_lasts() -> None:
    grad = [1.0, 1.2, 0.9, 1.1, 40.0, 1.0]
    assert run(own(), [*FALLING, 0.85], grad=grad)[0] is None
    epoch, trial = run(own(), [*FALLING, 0.85], grad=[*grad[:5], 45.0])
    assert epoch == 6
    assert trial.user_attrs["prune_rule"] == "divergence"
    assert trial.user_attrs["prune_reason"].startswith("grad_norm 45 > 30 x the median 1")


def test_stall_spares_a_run_that_learned_in_its_first_epoch() -> None:
    values = [0.10 - 0.0005 * i for i in range(15)]
    train = [0.9] + [0.1] * 14  # the first epoch's mean train loss shows how far it fell
    assert run(own(), values, train=train)[0] is None


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


def test_no_own_curve_rule_prunes_the_best_recorded_real_curves() -> None:
    """The 5 best of each task in benchmarks/pruning/curves oscillate early; none is pruned
    (one may be ended, at its best so far, and keep its value)."""
    pruner = DivergencePruner(None)
    for task, curve in _best_recorded_curves(5):
        values, train = (curve[k].astype(float).tolist() for k in range(2))
        _, verdict = judge_each_epoch(pruner, values, train=train)
        assert verdict is None or verdict.end, (task, verdict.reason)


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
    """Add `n` complete trials whose loss falls from 2.0 to 0.3-0.6 over 25 epochs."""
    trials = []
    for i in range(n):
        end = 0.3 * (1 + i / n)
        values = {e + 1: 2.0 * (end / 2.0) ** (e / 24) for e in range(25)}
        trials.append(optuna.trial.create_trial(value=end, intermediate_values=values))
    study.add_trials(trials)


def test_comparative_waits_for_enough_peers() -> None:
    study = study_with(DivergencePruner(TrendPruner(refresh_every=1)))
    _peers(study, 4)
    behind = [2.0 - 0.03 * e for e in range(20)]
    assert run(study, behind)[0] is None  # 4 complete < n_startup_trials
    assert run(study, behind)[0] == 5  # the 5th complete trial was the one above


def test_own_curve_decisions_read_other_trials_only_to_tell_pruned_from_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = study_with(DivergencePruner(TrendPruner(n_warmup_steps=5)))
    _peers(study, 10)
    trial = study.ask()
    reads: list[int] = []
    original = study._storage.get_all_trials
    monkeypatch.setattr(
        study._storage, "get_all_trials", lambda *a, **k: reads.append(1) or original(*a, **k)
    )
    history = []
    for epoch, (value, train) in enumerate([(3.2, 3.0), (1.8, 1.6), (2.5, 2.4)], start=1):
        trial.report(value, epoch)
        history.append({"epoch": epoch, "val_loss": value, "train_loss": train})
        trial.set_user_attr("epoch_metrics", history)
        assert not trial.should_prune()
    assert reads == []
    trial.report(2.6, 4)
    trial.set_user_attr(
        "epoch_metrics", [*history, {"epoch": 4, "val_loss": 2.6, "train_loss": 2.5}]
    )
    assert trial.should_prune()
    assert reads == [1]
    assert trial.user_attrs["prune_rule"] == "divergence"
    assert trial.user_attrs["infeasible"] is True  # best 1.8: behind all 10 peers, pruned


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
