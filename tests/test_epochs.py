"""Per-epoch rows (search/epochs.py): one upsert per epoch, readable without the table."""

from __future__ import annotations

import math

import optuna
import pytest

from search.epochs import ensure_table, record_epoch, stored_rows
from search.storage import open_storage


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest) -> optuna.storages.BaseStorage:
    url = request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    return open_storage(url)


def test_a_rewritten_epoch_replaces_its_row_and_nan_survives(storage, study_name: str) -> None:
    study = optuna.create_study(study_name=study_name, storage=storage)
    ensure_table(storage)
    ensure_table(storage)  # idempotent
    trial = study.ask()
    record_epoch(storage, trial._trial_id, 1, 0.9, {"epoch": 1, "val_loss": 0.9})
    record_epoch(storage, trial._trial_id, 1, 0.8, {"epoch": 1, "val_loss": 0.8})
    record_epoch(storage, trial._trial_id, 2, math.nan, {"epoch": 2, "val_loss": math.nan})
    rows = stored_rows(storage, trial._trial_id)
    assert rows[0] == {"epoch": 1, "val_loss": 0.8}
    assert math.isnan(rows[1]["val_loss"])
    frozen = storage.get_trial(trial._trial_id)
    assert frozen.intermediate_values[1] == 0.8 and math.isnan(frozen.intermediate_values[2])


def test_a_database_without_the_table_has_no_rows(sqlite_url: str) -> None:
    storage = open_storage(sqlite_url)
    study = optuna.create_study(storage=storage)
    assert stored_rows(storage, study.ask()._trial_id) == []
