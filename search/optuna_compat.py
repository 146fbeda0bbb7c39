"""Every use of Optuna's private API, behind a few named helpers.

`search` needs a little more than Optuna's public API: trial and study ids, the RDB storage
behind Optuna's cache, its SQLAlchemy models and sessions, and heartbeat rows. Each such name
is used here and nowhere else, and `tests/test_optuna_compat.py` pins every helper against the
installed Optuna, so an Optuna upgrade breaks this one file.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

if TYPE_CHECKING:
    import sqlalchemy
    from sqlalchemy.orm import Session


def trial_id(trial: optuna.trial.BaseTrial | FrozenTrial) -> int:
    """The storage's id of a live or frozen trial (not its number)."""
    return int(trial._trial_id)  # type: ignore[union-attr]


def study_id(study: optuna.Study) -> int:
    return int(study._study_id)


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes through (Optuna's cache around an RDB storage)."""
    return study._storage


def rdb(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage:
    """The RDB storage behind Optuna's `_CachedStorage` (or `storage` itself)."""
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        raise TypeError(f"search needs an RDB storage, got {type(backend).__name__}")
    return backend


def engine_of(storage: optuna.storages.BaseStorage) -> sqlalchemy.Engine:
    return rdb(storage).engine


@contextlib.contextmanager
def session(storage: optuna.storages.BaseStorage) -> Iterator[Session]:
    """One transaction on the storage's own session factory: committed on success, rolled
    back on error; errors come out as Optuna's `StorageInternalError`, as Optuna's own are."""
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb(storage).scoped_session) as opened:
        yield opened


def models() -> Any:
    """Optuna's SQLAlchemy models (`TrialModel`, `StudyModel`, ...)."""
    from optuna.storages._rdb import models as rdb_models

    return rdb_models


def trial_system_attrs(trial: optuna.trial.BaseTrial | FrozenTrial) -> dict[str, Any]:
    """A trial's system attributes, whether live (`optuna.Trial`) or frozen."""
    if isinstance(trial, FrozenTrial):
        return trial.system_attrs
    return trial.study._storage.get_trial_system_attrs(trial_id(trial))  # type: ignore[attr-defined]


def trial_of_number(study: optuna.Study, number: int) -> FrozenTrial:
    storage = storage_of(study)
    return storage.get_trial(
        storage.get_trial_id_from_study_id_trial_number(study_id(study), number)
    )


def stale_trial_ids(storage: optuna.storages.BaseStorage, study: optuna.Study) -> list[int]:
    """RUNNING trials whose last heartbeat is older than the storage's grace period."""
    return list(rdb(storage)._get_stale_trial_ids(study_id(study)))


def heartbeats(
    storage: optuna.storages.BaseStorage, trial_ids: list[int]
) -> dict[int, datetime.datetime]:
    """The last heartbeat time (database clock) of each of `trial_ids` that ever beat."""
    if not trial_ids:
        return {}
    heartbeat = models().TrialHeartbeatModel
    with session(storage) as opened:
        rows = opened.query(heartbeat.trial_id, heartbeat.heartbeat).filter(
            heartbeat.trial_id.in_(trial_ids)
        )
        return {int(row.trial_id): row.heartbeat for row in rows}


def cached_backend_calls() -> set[str]:
    """Names of the RDB storage methods Optuna's cache calls (each must be retried)."""
    from optuna.storages import _cached_storage

    source = inspect.getsource(_cached_storage._CachedStorage)
    return set(re.findall(r"self\._backend\.(\w+)\(", source))


def database_now(storage: optuna.storages.BaseStorage) -> datetime.datetime:
    """The database's clock, the one heartbeat rows are written with."""
    import sqlalchemy

    with session(storage) as opened:
        return opened.execute(sqlalchemy.func.current_timestamp()).scalar_one()


def show_long_attributes(limit: int = 1 << 20) -> None:
    """Let optuna-dashboard show attribute values up to `limit` characters (it cuts them at
    1,024: a trial's `epoch_metrics` is longer)."""
    from optuna_dashboard import _serializer

    _serializer.MAX_ATTR_LENGTH = max(_serializer.MAX_ATTR_LENGTH, limit)
