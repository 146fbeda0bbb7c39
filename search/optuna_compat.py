"""Every use of Optuna's private API, behind a few named helpers.

`search` needs a little more than Optuna's public API: trial and study ids, the RDB storage
behind Optuna's cache, its SQLAlchemy models and sessions, and heartbeat rows. Each such name
is used here and nowhere else, and `tests/test_optuna_compat.py` pins every helper against the
installed Optuna, so an Optuna upgrade breaks this one file. The service's own atomic steps
(claiming a trial, failing one with its retry) live here too, each one transaction, retried
on a dropped connection like every storage call.
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

from search.transient import retry_transient

if TYPE_CHECKING:
    import sqlalchemy
    import sqlalchemy as sa
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


def is_rdb(storage: optuna.storages.BaseStorage) -> bool:
    return isinstance(getattr(storage, "_backend", storage), optuna.storages.RDBStorage)


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


@retry_transient
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


# --- atomic steps of the service, each one database transaction ---------------------------


def _lock_study_row(opened: Session, study: int) -> None:
    """Serialize this study's trial creation (the lock Optuna's own `create_new_trial` takes):
    a no-op write, so PostgreSQL takes a row lock and SQLite its write lock up front."""
    studies = models().StudyModel.__table__
    opened.execute(
        studies.update().where(studies.c.study_id == study).values(study_name=studies.c.study_name)
    )


@retry_transient
def claim_trial(storage: optuna.storages.BaseStorage, study: int, budget: int) -> int | None:
    """Take the oldest WAITING trial, else create a RUNNING one while fewer than `budget`
    trials are finished, running or waiting; record its first heartbeat in the same step.

    Returns:
        The claimed trial's id, or None when the budget has no free slot.
    """
    from optuna.trial import TrialState

    rdb_models = models()
    trials = rdb_models.TrialModel
    with session(storage) as opened:
        _lock_study_row(opened, study)
        trial = (
            opened.query(trials)
            .filter(trials.study_id == study, trials.state == TrialState.WAITING)
            .order_by(trials.trial_id)
            .first()
        )
        if trial is not None:
            trial.state = TrialState.RUNNING
            trial.datetime_start = datetime.datetime.now()
        else:
            holding = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE)
            claimed = (
                opened.query(trials.trial_id)
                .filter(trials.study_id == study, trials.state.in_((*holding, TrialState.PRUNED)))
                .count()
            )
            if claimed >= budget:
                return None
            trial = rdb(storage)._get_prepared_new_trial(study, None, opened)
        opened.flush()
        opened.add(rdb_models.TrialHeartbeatModel(trial_id=trial.trial_id))
        return int(trial.trial_id)


def adopt_trial(study: optuna.Study, claimed_id: int) -> optuna.Trial:
    """The live `optuna.Trial` for a trial claimed outside `Study.ask` (as `ask` builds it)."""
    storage = storage_of(study)
    frozen = rdb(storage).get_trial(claimed_id)
    with storage._lock:  # type: ignore[attr-defined]
        if study_id(study) not in storage._studies:  # type: ignore[attr-defined]
            storage._read_trials_from_remote_storage(study_id(study))  # type: ignore[attr-defined]
        storage._add_trials_to_cache(study_id(study), [frozen])  # type: ignore[attr-defined]
        storage._studies[study_id(study)].unfinished_trial_ids.add(claimed_id)  # type: ignore[attr-defined]
    study._thread_local.cached_all_trials = None
    return optuna.Trial(study, claimed_id)


@retry_transient
def fail_and_replace(
    storage: optuna.storages.BaseStorage,
    study: int,
    failed_id: int,
    *,
    attrs: dict[str, Any],
    retry: FrozenTrial | None,
) -> bool:
    """Fail a RUNNING trial and, in the same transaction, queue `retry` (a WAITING template).

    Returns:
        False when the trial was no longer RUNNING (someone else finished it): nothing done.
    """
    from optuna.trial import TrialState

    rdb_models = models()
    backend = rdb(storage)
    with session(storage) as opened:
        _lock_study_row(opened, study)
        trial = rdb_models.TrialModel.find_or_raise_by_id(failed_id, opened, for_update=True)
        if trial.state != TrialState.RUNNING:
            return False
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(
                opened, rdb_models.TrialUserAttributeModel, failed_id, key, value
            )
        if retry is not None:
            backend._get_prepared_new_trial(study, retry, opened)
        trial.state = TrialState.FAIL
        trial.datetime_complete = datetime.datetime.now()
    return True


@retry_transient
def append_study_system_attr(
    storage: optuna.storages.BaseStorage, study: int, key: str, item: Any
) -> None:
    """Append `item` to the list in the study's system attribute `key`, in one transaction
    that holds the study's row lock, so concurrent appends are never lost."""
    import json

    rdb_models = models()
    attrs = rdb_models.StudySystemAttributeModel
    with session(storage) as opened:
        _lock_study_row(opened, study)
        row = opened.query(attrs).filter(attrs.study_id == study, attrs.key == key).one_or_none()
        if row is None:
            opened.add(attrs(study_id=study, key=key, value_json=json.dumps([item])))
        else:
            row.value_json = json.dumps([*json.loads(row.value_json), item])


def write_intermediate(
    opened: Session, storage: optuna.storages.BaseStorage, trial: int, step: int, value: float
) -> None:
    """Optuna's intermediate value write as one upsert inside the caller's transaction, made
    only while the trial is RUNNING; raises `UpdateFinishedTrialError` otherwise."""
    import sqlalchemy as sa
    from optuna.trial import TrialState

    rdb_models = models()
    table = rdb_models.TrialIntermediateValueModel.__table__
    trials = rdb_models.TrialModel.__table__
    stored, kind = rdb_models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
    running = sa.select(trials.c.trial_id).where(
        trials.c.trial_id == trial, trials.c.state == TrialState.RUNNING
    )
    values = sa.select(
        sa.literal(trial, sa.Integer),
        sa.literal(step, sa.Integer),
        sa.literal(stored, sa.Float),
        sa.literal(kind, table.c.intermediate_value_type.type),
    ).where(running.exists())
    columns = ["trial_id", "step", "intermediate_value", "intermediate_value_type"]
    insert = _dialect_insert(opened)(table).from_select(columns, values)
    upsert = insert.on_conflict_do_update(
        index_elements=["trial_id", "step"],
        set_={
            "intermediate_value": insert.excluded.intermediate_value,
            "intermediate_value_type": insert.excluded.intermediate_value_type,
        },
    )
    result: Any = opened.execute(upsert)  # a CursorResult, which has rowcount
    if result.rowcount == 0:
        raise optuna.exceptions.UpdateFinishedTrialError(
            f"trial id {trial} is finished: its intermediate values cannot change"
        )


def upsert(opened: Session, table: sa.Table, row: dict[str, Any], keys: list[str]) -> None:
    """Insert `row` into `table`, or update the row with the same `keys` (PostgreSQL, SQLite)."""
    insert = _dialect_insert(opened)(table).values(**row)
    others = {k: v for k, v in row.items() if k not in keys}
    opened.execute(insert.on_conflict_do_update(index_elements=keys, set_=others))


def _dialect_insert(opened: Session) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if opened.get_bind().dialect.name == "postgresql" else sqlite.insert


@retry_transient
def stale_running(
    storage: optuna.storages.BaseStorage, study: int, grace_period: float
) -> list[int]:
    """RUNNING trials whose last heartbeat (or start, if they never beat) is older than
    `grace_period` seconds by the database's clock."""
    from optuna.trial import TrialState

    rdb_models = models()
    trials, beats = rdb_models.TrialModel, rdb_models.TrialHeartbeatModel
    with session(storage) as opened:
        import sqlalchemy as sa

        now = opened.execute(sa.func.now()).scalar()
        assert now is not None
        cutoff = now.replace(tzinfo=None) - datetime.timedelta(seconds=grace_period)
        rows = (
            opened.query(trials.trial_id, trials._datetime_start_utc, beats.heartbeat)
            .outerjoin(beats, beats.trial_id == trials.trial_id)
            .filter(trials.study_id == study, trials.state == TrialState.RUNNING)
            .all()
        )
    # `datetime_start` is stored as naive UTC by the worker's clock (Optuna's convention).
    utc_now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    start_cutoff = utc_now - datetime.timedelta(seconds=grace_period)
    stale = []
    for trial, started, beat in rows:
        if beat is not None:
            if beat.replace(tzinfo=None) < cutoff:
                stale.append(int(trial))
        elif started is not None and started < start_cutoff:
            stale.append(int(trial))
    return stale


@retry_transient
def count_states(storage: optuna.storages.BaseStorage, study: int) -> dict[str, int]:
    """Trials of the study per state name, counted in the database."""
    import sqlalchemy as sa

    trials = models().TrialModel
    with session(storage) as opened:
        rows = (
            opened.query(trials.state, sa.func.count(trials.trial_id))
            .filter(trials.study_id == study)
            .group_by(trials.state)
            .all()
        )
    return {state.name: int(count) for state, count in rows}


def reseed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Reseed a TPE or random sampler's generators (Optuna only offers a random reseed)."""
    for owner in (sampler, getattr(sampler, "_random_sampler", None)):
        rng = getattr(owner, "_rng", None)
        if rng is not None:
            rng.rng.seed(seed % 2**32)


def schema_problem(storage: optuna.storages.BaseStorage) -> str | None:
    """Why the storage's schema does not fit the installed Optuna, or None if it does
    (Optuna's own check, done with one connection at a time)."""
    manager = rdb(storage)._version_manager
    current, head = manager.get_current_version(), manager.get_head_version()
    if current == head:
        return None
    if current in manager.get_all_versions():
        return (
            f"its schema ({current}) is older than this Optuna's ({head}); upgrade it with "
            "`optuna storage upgrade --storage URL`"
        )
    return f"its schema ({current}) is newer than this Optuna knows ({head}); upgrade optuna"


def latest_trial(trial: optuna.Trial) -> FrozenTrial:
    """The frozen view of a live trial that `Trial.should_prune` hands to a pruner."""
    return trial._get_latest_trial()


def note_intermediate(trial: optuna.Trial, step: int, value: float) -> None:
    """Mirror an intermediate value written outside `Trial.report` into the live trial's
    cache, where `Trial.should_prune` hands it to Optuna's pruners."""
    trial._cached_frozen_trial.intermediate_values[step] = value


@retry_transient
def set_user_attrs(
    storage: optuna.storages.BaseStorage, trial: optuna.Trial, attrs: dict[str, Any]
) -> None:
    """Set several user attributes of a live trial in one transaction (and in its cache)."""
    rdb_models = models()
    with session(storage) as opened:
        for key, value in attrs.items():
            rdb(storage)._set_trial_attr_without_commit(
                opened, rdb_models.TrialUserAttributeModel, trial_id(trial), key, value
            )
    trial._cached_frozen_trial.user_attrs.update(attrs)


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


class RecentTrials:
    """A study as a sampler sees it when only its `window` latest finished trials count:
    `_get_trials`, the one call Optuna's TPE reads trials through, is cut to them (running
    trials stay, for the constant liar); everything else is the study itself."""

    def __init__(self, study: optuna.Study, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, but got {window=}")
        self._study, self._window = study, window

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self, deepcopy: bool = True, states: Any = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        import copy

        trials = self._study._get_trials(deepcopy=False, states=states, use_cache=use_cache)
        finished = [t for t in trials if t.state.is_finished()]
        if len(finished) > self._window:
            cut = finished[-self._window].number
            trials = [t for t in trials if not t.state.is_finished() or t.number >= cut]
        return copy.deepcopy(trials) if deepcopy else trials
