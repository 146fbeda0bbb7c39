"""The `report` callable (search/reporter.py): one write per epoch, pruning, early stopping."""

from __future__ import annotations

import threading

import numpy as np
import optuna
import pytest
from conftest import base_spec, survivors_and_pruned

from search.exceptions import EarlyStopped, ObjectiveError, Preempted, TrialLost
from search.optuna_compat import trial_id
from search.reporter import PeerFeed, Reporter
from search.spec import spec_from_dict
from search.storage import open_storage

SPEC = base_spec("r", pruning={"pruner": "none"})


def _reporter(url: str | None = None, **spec: object) -> tuple[optuna.Trial, Reporter]:
    storage = open_storage(url) if url else None
    study = optuna.create_study(storage=storage, pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    return trial, Reporter(trial, spec_from_dict({**SPEC, **spec}))


def test_early_stopping_ends_a_plateaued_trial_after_patience_epochs() -> None:
    _, report = _reporter(early_stopping={"patience": 2, "min_delta": 0.01})
    for epoch, loss in enumerate([1.0, 0.8, 0.795, 0.79], start=1):
        if epoch < 4:
            report(epoch, {"val_loss": loss})
    with pytest.raises(EarlyStopped, match=r"not improved by more than 0.01 for 2 epochs"):
        report(4, {"val_loss": 0.79})
    assert (report.best, report.best_epoch) == (0.8, 2)


def test_early_stopping_waits_while_the_metric_improves() -> None:
    _, report = _reporter(early_stopping={"patience": 2})
    for epoch in range(1, 8):
        report(epoch, {"val_loss": 1.0 / epoch})
    assert report.best_epoch == 7


def test_a_maximized_metric_counts_rises_as_improvements() -> None:
    _, report = _reporter(direction="maximize", metric="val_accuracy",
                          early_stopping={"patience": 1})
    report(1, {"val_accuracy": 0.5})
    report(2, {"val_accuracy": 0.7})
    with pytest.raises(EarlyStopped):
        report(3, {"val_accuracy": 0.6})
    assert report.best == 0.7


def test_a_missing_metric_is_an_objective_error_naming_both() -> None:
    _, report = _reporter()
    with pytest.raises(ObjectiveError, match=r"reported \['loss'\] but the study's metric is"):
        report(1, {"loss": 1.0})


def test_tensors_and_numpy_scalars_are_numbers_and_strings_are_not() -> None:
    import torch

    trial, report = _reporter()
    report(1, {"val_loss": torch.tensor(0.5), "lr": np.float32(0.1)})
    assert trial.study.trials[0].intermediate_values == {1: 0.5}
    with pytest.raises(ObjectiveError, match="which is not a number"):
        report(2, {"val_loss": "low"})


def test_a_stop_request_preempts_after_the_epoch_is_recorded() -> None:
    trial, report = _reporter()
    report.stop_event = threading.Event()
    report.stop_event.set()
    with pytest.raises(Preempted):
        report(1, {"val_loss": 1.0})
    assert trial.study.trials[0].intermediate_values == {1: 1.0}


def test_each_epoch_is_one_row_on_a_database(sqlite_url: str) -> None:
    from search.epochs import ensure_table, stored_rows

    trial, report = _reporter(sqlite_url)
    ensure_table(trial.study._storage)
    for epoch in range(1, 4):
        report(epoch, {"val_loss": 1.0 / epoch, "train_loss": 2.0 / epoch})
    rows = stored_rows(trial.study._storage, trial_id(trial))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[2] == {"epoch": 3, "val_loss": 1 / 3, "train_loss": 2 / 3}
    assert trial.study.trials[0].intermediate_values == {1: 1.0, 2: 0.5, 3: 1 / 3}


def test_a_report_on_a_trial_finished_elsewhere_is_lost(sqlite_url: str) -> None:
    from search.epochs import ensure_table

    trial, report = _reporter(sqlite_url)
    ensure_table(trial.study._storage)
    trial.study._storage.set_trial_state_values(trial_id(trial), optuna.trial.TrialState.FAIL)
    with pytest.raises(TrialLost):
        report(1, {"val_loss": 1.0})


def test_the_peer_view_is_reread_only_when_stale(sqlite_url: str) -> None:
    study = optuna.create_study(storage=open_storage(sqlite_url))
    feed = PeerFeed(study, staleness=3600)
    assert feed.current().finished == 0
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={1: 1.0}))
    assert feed.current().finished == 0, "still within its staleness"
    own = study.ask()
    study.tell(own, 2.0)
    feed.add_own(trial_id(own))
    assert feed.current().finished == 1, "the worker's own trial, at once"
    feed.staleness = 0
    assert feed.current().finished == 2


def test_a_wrapped_optuna_pruner_is_asked_in_the_workers_path(sqlite_url: str) -> None:
    from search.epochs import ensure_table
    from search.pruning import make_pruner

    study = optuna.create_study(storage=open_storage(sqlite_url),
                                pruner=make_pruner("default", {"comparative": "median"}))
    ensure_table(study._storage)
    for _ in range(6):  # peers that reach 0.1 by epoch 6
        peer = study.ask()
        for step in range(1, 7):
            peer.report(1.0 / step, step)
        study.tell(peer, 1.0 / 6)
    trial = study.ask()
    report = Reporter(trial, spec_from_dict(SPEC))
    with pytest.raises(optuna.TrialPruned, match="pruned by MedianPruner"):
        for step in range(1, 7):
            report(step, {"val_loss": 5.0})
    assert trial.user_attrs["prune_rule"] == "comparative"


def test_a_good_trial_stopped_by_the_comparison_after_its_best_ends_at_it(sqlite_url: str) -> None:
    """The worker's path on a real database: behind the 5 complete survivors but better than
    the 10 trials pruned early, a plateaued trial is ended at its best (COMPLETE), not lost."""
    from search.epochs import ensure_table
    from search.pruning import default_pruner

    study = optuna.create_study(storage=open_storage(sqlite_url), pruner=default_pruner())
    ensure_table(study._storage)
    study.add_trials(survivors_and_pruned())
    trial = study.ask()
    report = Reporter(trial, spec_from_dict(SPEC), peers=PeerFeed(study))
    plateau = [2.0, 1.6, 1.3, 1.2, 1.15, 1.15, 1.16, 1.15, 1.16, 1.17]
    with pytest.raises(EarlyStopped, match=r"ended at its best 1\.15 \(epoch 5\)") as stopped:
        for step, value in enumerate(plateau, start=1):
            report(step, {"val_loss": value})
    assert stopped.value.rule == "comparative" and step == 9
    assert (report.best, report.best_epoch) == (1.15, 5)
    assert trial.user_attrs["prune_rule"] == "comparative"
