"""Every helper around Optuna's private API, pinned against the installed Optuna."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import optuna_compat
from search.storage import open_storage

PACKAGE = Path(__file__).resolve().parent.parent / "search"
PRIVATE = ("_storage", "_trial_id", "_study_id", "_backend", "_cached_frozen_trial", "_rng",
           "_get_stale_trial_ids", "_version_manager", "_thread_local")


def test_optuna_private_names_are_used_only_in_optuna_compat() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "optuna_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id == "self"):
                    offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and "._" in (node.module or "") and (
                    node.module or "").startswith("optuna"):
                offenders.append(f"{path.name}:{node.lineno} from {node.module}")
    assert offenders == []


@pytest.fixture
def study(sqlite_url: str) -> optuna.Study:
    return optuna.create_study(study_name="compat", storage=open_storage(sqlite_url))


def test_ids_and_the_rdb_behind_the_cache(study: optuna.Study) -> None:
    trial = study.ask()
    assert optuna_compat.trial_id(trial) == study.trials[0]._trial_id
    assert optuna_compat.study_id(study) == study._study_id
    assert isinstance(optuna_compat.rdb(optuna_compat.storage_of(study)),
                      optuna.storages.RDBStorage)
    assert optuna_compat.is_rdb(optuna_compat.storage_of(study))
    assert not optuna_compat.is_rdb(optuna.create_study()._storage)


def test_claim_takes_waiting_first_then_creates_within_the_budget(study: optuna.Study) -> None:
    storage, sid = optuna_compat.storage_of(study), optuna_compat.study_id(study)
    study.enqueue_trial({"x": 0.5})
    first = optuna_compat.claim_trial(storage, sid, budget=2)
    assert first is not None and storage.get_trial(first).state == TrialState.RUNNING
    second = optuna_compat.claim_trial(storage, sid, budget=2)
    assert second is not None and second != first
    assert optuna_compat.claim_trial(storage, sid, budget=2) is None
    beats = optuna_compat.heartbeats(storage, [first, second])
    assert set(beats) == {first, second}, "the claim records the first heartbeat"
    trial = optuna_compat.adopt_trial(study, second)
    trial.suggest_float("x", 0, 1)
    study.tell(trial, 1.0)
    assert study.trials[1].state == TrialState.COMPLETE


def test_fail_and_replace_queues_the_retry_in_the_same_step(study: optuna.Study) -> None:
    storage, sid = optuna_compat.storage_of(study), optuna_compat.study_id(study)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    frozen = storage.get_trial(trial._trial_id)
    template = optuna.trial.create_trial(state=TrialState.WAITING, params=frozen.params,
                                         distributions=frozen.distributions)
    assert optuna_compat.fail_and_replace(storage, sid, frozen._trial_id,
                                          attrs={"fail_reason": "x"}, retry=template)
    assert not optuna_compat.fail_and_replace(storage, sid, frozen._trial_id, attrs={},
                                              retry=template)
    failed, retry = study.get_trials()
    assert (failed.state, failed.user_attrs) == (TrialState.FAIL, {"fail_reason": "x"})
    assert retry.state == TrialState.WAITING and retry.params == failed.params


def test_stale_running_by_heartbeat_or_start(study: optuna.Study) -> None:
    storage, sid = optuna_compat.storage_of(study), optuna_compat.study_id(study)
    beating, silent = study.ask(), study.ask()
    storage.record_heartbeat(beating._trial_id)
    assert optuna_compat.stale_running(storage, sid, grace_period=60) == []
    time.sleep(2.1)
    assert sorted(optuna_compat.stale_running(storage, sid, grace_period=1)) == sorted(
        [beating._trial_id, silent._trial_id])


def test_counts_schema_and_reseed(study: optuna.Study) -> None:
    storage = optuna_compat.storage_of(study)
    study.tell(study.ask(), 1.0)
    study.ask()
    assert optuna_compat.count_states(storage, optuna_compat.study_id(study)) == {
        "COMPLETE": 1, "RUNNING": 1}
    assert optuna_compat.schema_problem(storage) is None
    sampler = optuna.samplers.TPESampler()
    optuna_compat.reseed_sampler(sampler, 7)
    first = sampler._rng.rng.rand()
    optuna_compat.reseed_sampler(sampler, 7)
    assert sampler._rng.rng.rand() == first


def test_cached_backend_calls_are_read_from_optunas_cache() -> None:
    assert {"_get_trials", "_set_trial_param", "_create_new_trial", "get_trial"} <= (
        optuna_compat.cached_backend_calls())


def test_note_intermediate_reaches_optunas_pruners(study: optuna.Study) -> None:
    trial = study.ask()
    optuna_compat.note_intermediate(trial, 3, 0.25)
    assert trial._get_latest_trial().intermediate_values == {3: 0.25}


def test_database_now_is_the_clock_heartbeats_use(study: optuna.Study) -> None:
    trial = study.ask()
    storage = optuna_compat.storage_of(study)
    optuna_compat.rdb(storage).record_heartbeat(optuna_compat.trial_id(trial))
    beat = optuna_compat.heartbeats(storage, [optuna_compat.trial_id(trial)])
    now = optuna_compat.database_now(storage)
    assert 0 <= (now - beat[optuna_compat.trial_id(trial)]).total_seconds() < 60


def test_show_long_attributes_lifts_optuna_dashboards_cut() -> None:
    from optuna_dashboard import _serializer

    optuna_compat.show_long_attributes()
    long = {"epoch_metrics": "x" * 5000}
    assert _serializer.serialize_attrs(long) == [{"key": "epoch_metrics", "value": "x" * 5000}]


def test_recent_trials_keeps_the_latest_finished_and_every_running_trial() -> None:
    study = optuna.create_study()
    for value in range(6):
        study.tell(study.ask(), float(value))
    running = study.ask()
    recent = optuna_compat.RecentTrials(study, 3)
    assert [t.number for t in recent._get_trials(deepcopy=False)] == [3, 4, 5, running.number]
    assert recent.direction == study.direction, "everything else is the study itself"
    with pytest.raises(ValueError, match="window must be >= 1"):
        optuna_compat.RecentTrials(study, 0)


def test_the_recent_tpe_sampler_samples_from_a_windowed_study() -> None:
    from search.study import RecentTPESampler

    study = optuna.create_study(sampler=RecentTPESampler(seed=0, n_startup_trials=2,
                                                         constant_liar=True, multivariate=True))
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.5) ** 2, n_trials=15)
    assert study.best_value < 0.05


def test_concurrent_appends_to_a_study_attribute_are_all_kept(pg_url: str,
                                                               study_name: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    study = optuna.create_study(study_name=study_name, storage=open_storage(pg_url))
    sid = optuna_compat.study_id(study)

    def append(i: int) -> None:
        optuna_compat.append_study_system_attr(open_storage(pg_url), sid, "oom:cpu", {"i": i})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(append, range(16)))
    stored = open_storage(pg_url).get_study_system_attrs(sid)["oom:cpu"]
    assert sorted(r["i"] for r in stored) == list(range(16))
