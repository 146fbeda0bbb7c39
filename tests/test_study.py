"""Creating and editing studies on real storages: secrets, allowed edits, concurrent creates."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from conftest import base_spec, cli_env, sleepy_spec
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search import record
from search.exceptions import StudyConflictError
from search.spec import spec_from_dict
from search.storage import normalize_url, open_storage
from search.study import create_or_update_study, load_study

PASSWORD = "s3cr3t-Pa55"


def _update(url: str, spec: dict, **kwargs):
    return create_or_update_study(spec_from_dict(spec), open_storage(url), **kwargs)


def _search(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=cli_env())


def test_a_password_in_the_study_file_is_never_stored(
        pg_url: str, study_name: str, write_spec, tmp_path: Path) -> None:
    # The test server trusts every login, so any password is a real one that connects.
    with_password = make_url(pg_url).set(password=PASSWORD).render_as_string(False)
    spec_path = write_spec(sleepy_spec(study_name, n_trials=2, storage=with_password))
    created = _search("create", str(spec_path), cwd=tmp_path)
    assert created.returncode == 0, created.stderr[-2000:]
    assert PASSWORD not in created.stdout + created.stderr
    study = optuna.load_study(study_name=study_name, storage=open_storage(pg_url))
    assert PASSWORD not in json.dumps(study.user_attrs)
    assert "storage" not in study.user_attrs[record.SPEC]
    listed = subprocess.run(["optuna", "studies", "--storage", normalize_url(pg_url), "-f",
                             "json"], capture_output=True, text=True, timeout=120, check=True)
    assert study_name in listed.stdout and PASSWORD not in listed.stdout


def test_a_password_stored_by_an_older_version_is_scrubbed(
        sqlite_url: str, study_name: str) -> None:
    spec = sleepy_spec(study_name, storage=f"postgresql://u:{PASSWORD}@db/x")
    study = _update(sqlite_url, spec).study
    study.set_user_attr(record.SPEC, spec_from_dict(spec).resolved())  # as before the fix
    _update(sqlite_url, spec)
    assert PASSWORD not in json.dumps(study.user_attrs)


def test_the_budget_changes_only_when_asked(sqlite_url: str, study_name: str) -> None:
    spec = sleepy_spec(study_name, n_trials=20)
    assert _update(sqlite_url, spec, n_trials=4).created
    again = _update(sqlite_url, spec)
    assert again.changes == () and again.study.user_attrs[record.BUDGET] == 4
    assert "no changes applied" in again.describe()
    grown = _update(sqlite_url, {**spec, "n_trials": 30})
    assert [str(c) for c in grown.changes] == ["n_trials: 4 -> 30"]
    assert grown.study.user_attrs[record.BUDGET] == 30
    (entry,) = grown.study.user_attrs[record.SPEC_CHANGES]
    assert entry["field"] == "n_trials" and (entry["old"], entry["new"]) == (4, 30)
    assert entry["time"].startswith("20")


def test_the_budget_never_drops_below_the_finished_trials(
        sqlite_url: str, study_name: str) -> None:
    study = _update(sqlite_url, sleepy_spec(study_name, n_trials=10)).study
    for x in (0.1, 0.2, 0.3):
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=x, params={"x": x},
            distributions={"x": optuna.distributions.FloatDistribution(-1, 1)}))
    with pytest.raises(StudyConflictError, match="3 trials have already finished"):
        _update(sqlite_url, sleepy_spec(study_name, n_trials=10), n_trials=2)
    assert study.user_attrs[record.BUDGET] == 10
    assert [str(c) for c in _update(sqlite_url, sleepy_spec(study_name), n_trials=3).changes
            ] == ["n_trials: 10 -> 3"]


def test_workers_pruning_and_early_stopping_edits_are_applied_and_recorded(
        sqlite_url: str, study_name: str) -> None:
    spec = sleepy_spec(study_name)
    _update(sqlite_url, spec)
    edited = {**spec, "workers": {**spec["workers"], "max_retries": 3},
              "early_stopping": {"patience": 2}}
    update = _update(sqlite_url, edited)
    assert sorted(str(c) for c in update.changes) == [
        "early_stopping.patience: (none) -> 2", "workers.max_retries: 1 -> 3"]
    assert "applied: " in update.describe()
    _, stored = load_study(study_name, open_storage(sqlite_url))
    assert stored.workers.max_retries == 3 and stored.early_stopping.patience == 2
    fields = [c["field"] for c in update.study.user_attrs[record.SPEC_CHANGES]]
    assert sorted(fields) == ["early_stopping.patience", "workers.max_retries"]


@pytest.mark.parametrize(("edit", "message"), [
    ({"space": {**base_spec("x")["space"], "depth": {"low": 1, "high": 6}}},
     "space.depth.high: stored 2, new 6"),
    ({"seed": 1}, "seed: stored 0, new 1"),
    ({"sampler": {"type": "random"}}, "sampler.type: stored 'tpe', new 'random'"),
    ({"epochs": 9}, "epochs: stored 3, new 9"),
])
def test_identity_seed_and_sampler_edits_are_refused_with_both_values_and_nothing_applied(
        sqlite_url: str, study_name: str, edit: dict, message: str) -> None:
    spec = base_spec(study_name)
    study = _update(sqlite_url, spec).study
    before = dict(study.user_attrs)
    sneaky = {**spec, **edit, "n_trials": 50, "workers": {**spec["workers"], "max_retries": 4}}
    with pytest.raises(StudyConflictError) as refused:
        _update(sqlite_url, sneaky)
    assert message in str(refused.value)
    assert "..." not in str(refused.value)
    assert study.user_attrs == before, "a refused edit applies nothing"


def test_the_cli_says_what_was_applied(sqlite_url: str, study_name: str, write_spec,
                                       tmp_path: Path) -> None:
    spec = sleepy_spec(study_name)
    first = _search("create", str(write_spec(spec)), "--storage", sqlite_url, cwd=tmp_path)
    assert first.returncode == 0 and f"Created study {study_name}" in first.stdout
    edited = {**spec, "workers": {**spec["workers"], "max_failures": 9}}
    second = _search("create", str(write_spec(edited)), "--storage", sqlite_url, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "applied: workers.max_failures: (none) -> 9" in second.stdout


def _race(url: str, name: str) -> list[str]:
    """Two threads, each with its own connection pool, create `name` with different spaces."""
    storages = [open_storage(url) for _ in range(2)]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def create(storage: optuna.storages.BaseStorage, high: float) -> None:
        spec = sleepy_spec(name, space={"x": {"type": "float", "low": -1.0, "high": high}})
        barrier.wait()
        try:
            create_or_update_study(spec_from_dict(spec), storage)
            outcomes.append("won")
        except StudyConflictError as e:
            outcomes.append(f"refused: {e}")

    threads = [threading.Thread(target=create, args=(s, h))
               for s, h in zip(storages, (1.0, 2.0), strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return sorted(outcomes)


def test_of_two_concurrent_creates_with_different_spaces_exactly_one_wins(
        pg_url: str, study_name: str) -> None:
    for attempt in range(4):  # before the fix both won in 4 of 6 such races
        refused, won = _race(pg_url, f"{study_name}-{attempt}")
        assert won == "won", (refused, won)
        assert refused.startswith("refused: ") and "space.x.high: stored" in refused


def test_fields_added_by_a_newer_version_are_not_changes(sqlite_url: str, study_name: str) -> None:
    spec = sleepy_spec(study_name)
    study = _update(sqlite_url, spec).study
    older = dict(study.user_attrs[record.SPEC])
    del older["workers"]["keep_checkpoints"]  # as stored before that field existed
    study.set_user_attr(record.SPEC, older)
    assert _update(sqlite_url, spec).changes == ()


def test_a_new_study_queues_its_start_trial_once(sqlite_url: str, study_name: str) -> None:
    spec = base_spec(study_name, sampler={"start": "defaults"})
    study = _update(sqlite_url, spec).study
    [first] = study.trials
    assert first.state == TrialState.WAITING
    assert first.user_attrs[record.START] == "defaults"
    assert first.system_attrs["fixed_params"] == {
        "lr": 1e-3, "batch_size": 32, "depth": 2, "width": 16}  # width: 8..32, log middle
    assert len(_update(sqlite_url, spec).study.trials) == 1, "continuing queues nothing"
    assert _update(sqlite_url, base_spec(f"{study_name}-none")).study.trials == [], "by default"


def test_of_many_concurrent_creates_one_queues_the_start_trial(
        pg_url: str, study_name: str) -> None:
    storages = [open_storage(pg_url) for _ in range(4)]
    barrier = threading.Barrier(len(storages))

    def create(storage: optuna.storages.BaseStorage) -> None:
        barrier.wait()
        spec = sleepy_spec(study_name, sampler={"start": "defaults"})
        create_or_update_study(spec_from_dict(spec), storage)

    threads = [threading.Thread(target=create, args=(s,)) for s in storages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    trials = optuna.load_study(study_name=study_name, storage=open_storage(pg_url)).trials
    assert [(t.state, t.user_attrs[record.START], t.system_attrs["fixed_params"])
            for t in trials] == [(TrialState.WAITING, "defaults", {"x": 0.0})]


@pytest.mark.parametrize(
    ("asked", "says"),
    [
        ("digits-mpl", "no study 'digits-mpl' in sqlite:///"),
        ("digits-mpl", "; did you mean 'digits-mlp'?"),
        ("wine", "; studies there: alpha-0, alpha-1, alpha-10, alpha-11, alpha-2, alpha-3, "
                 "alpha-4, alpha-5, alpha-6, alpha-7 and 3 more"),
    ],
)
def test_a_study_not_found_is_one_short_line_that_names_the_nearest(
        sqlite_url: str, asked: str, says: str) -> None:
    """A shared database holds many studies: the error suggests the close names, or lists
    the first 10, never all of them."""
    from search.exceptions import StudyNotFoundError

    storage = open_storage(sqlite_url)
    for name in [f"alpha-{i}" for i in range(12)] + ["digits-mlp"]:
        optuna.create_study(study_name=name, storage=storage)
    with pytest.raises(StudyNotFoundError) as info:
        load_study(asked, storage)
    message = str(info.value)
    assert says in message and "\n" not in message
