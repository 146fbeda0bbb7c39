"""The exact budget (search/budget.py): claims in one transaction, from many processes at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import optuna
from optuna.trial import TrialState

from search.budget import budget_state, claim
from search.storage import open_storage


def _study(url: str, name: str, budget: int) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=open_storage(url))
    study.set_user_attr("n_trials", budget)
    return study


def test_claims_stop_at_the_budget_and_queued_retries_go_first(sqlite_url: str) -> None:
    study = _study(sqlite_url, "b", 3)
    study.enqueue_trial({"x": 0.25})
    first = claim(study)
    assert first is not None and first.suggest_float("x", 0, 1) == 0.25
    assert claim(study) is not None and claim(study) is not None
    assert claim(study) is None
    state = budget_state(study)
    assert (state.running, state.claimed, state.has_free_slot) == (3, 3, False)


def test_a_failed_trial_frees_its_slot(sqlite_url: str) -> None:
    study = _study(sqlite_url, "b", 1)
    trial = claim(study)
    assert trial is not None
    study.tell(trial, state=TrialState.FAIL)
    assert claim(study) is not None


def test_sixteen_processes_claiming_at_once_never_overshoot(pg_url: str, study_name: str) -> None:
    _study(pg_url, study_name, 10)

    def claim_all(_: int) -> int:
        own = optuna.load_study(study_name=study_name, storage=open_storage(pg_url))
        got = 0
        while (trial := claim(own)) is not None:
            own.tell(trial, 1.0)
            got += 1
        return got

    with ThreadPoolExecutor(16) as pool:
        claimed = list(pool.map(claim_all, range(16)))
    assert sum(claimed) == 10
    study = optuna.load_study(study_name=study_name, storage=open_storage(pg_url))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 10
    assert sorted(t.number for t in study.trials) == list(range(10))
