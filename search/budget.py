"""The study's trial budget, counted in the database and claimed in one atomic step.

Exactly `n_trials` trials must finish (COMPLETE + PRUNED) however many workers run. A worker
claims a trial in one short transaction (`claim`): it takes the oldest WAITING trial (a
retry), or creates a RUNNING one only while the trials that can still finish (finished,
running and waiting) number fewer than the budget, and records the trial's first heartbeat.
Sampling happens afterwards, outside any lock. A worker that dies after its claim leaves a
trial whose heartbeat goes stale, which any worker reaps and retries.

`study_lock` is a study-wide lock for rare administrative steps (creating a study, recording
an out-of-memory config): a PostgreSQL advisory lock, or an OS file lock beside the SQLite
file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.pool
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search import optuna_compat, record
from search.transient import retry_transient

logger = logging.getLogger(__name__)

BUDGET_ATTR = record.BUDGET


@dataclass(frozen=True)
class BudgetState:
    """How a study stands against its budget."""

    n_trials: int
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def claimed(self) -> int:
        """Trials that count, or may still count, against the budget."""
        return self.finished + self.running + self.waiting

    @property
    def done(self) -> bool:
        return self.finished >= self.n_trials

    @property
    def has_free_slot(self) -> bool:
        return self.claimed < self.n_trials


def budget_state(study: optuna.Study) -> BudgetState:
    """Count the study's trials per state (in the database) against its stored budget."""
    storage = optuna_compat.storage_of(study)
    counts = optuna_compat.count_states(storage, optuna_compat.study_id(study))
    return BudgetState(
        n_trials=int(study.user_attrs.get(BUDGET_ATTR, 0)),
        complete=counts.get(TrialState.COMPLETE.name, 0),
        pruned=counts.get(TrialState.PRUNED.name, 0),
        failed=counts.get(TrialState.FAIL.name, 0),
        running=counts.get(TrialState.RUNNING.name, 0),
        waiting=counts.get(TrialState.WAITING.name, 0),
    )


def claim(study: optuna.Study) -> optuna.Trial | None:
    """Claim the study's next trial in one transaction; None when the budget has no slot."""
    storage = optuna_compat.storage_of(study)
    budget = int(study.user_attrs.get(BUDGET_ATTR, 0))
    claimed = optuna_compat.claim_trial(storage, optuna_compat.study_id(study), budget)
    return None if claimed is None else optuna_compat.adopt_trial(study, claimed)




@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Hold the study-wide lock that guards budget claims and reaping."""
    engine = optuna_compat.engine_of(optuna_compat.storage_of(study))
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, study.study_name):
            yield
    else:
        with _file_lock(engine.url, study.study_name):
            yield


@contextlib.contextmanager
def _advisory_lock(engine: sqlalchemy.Engine, name: str) -> Iterator[None]:
    key = int.from_bytes(hashlib.sha1(f"search:{name}".encode()).digest()[:8], "big", signed=True)
    # A connection of its own, outside the process's one pooled connection, so storage calls
    # can be made while the lock is held (a rare administrative step).
    own = sqlalchemy.create_engine(
        engine.url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10}
    )
    try:
        connection = _locked_connection(own, key)
        try:
            yield
        finally:
            with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                connection.rollback()
                connection.close()
    finally:
        own.dispose()


def _locked_connection(engine: sqlalchemy.Engine, key: int) -> sqlalchemy.Connection:
    """A connection holding the transaction-level advisory lock `key` (released when its
    transaction ends, even if the connection dies or sits behind a transaction-pooling
    PgBouncer); a dropped connection while waiting is retried like every storage call."""

    def lock(_: Any) -> sqlalchemy.Connection:
        connection = engine.connect()
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        except BaseException:
            connection.close()
            raise
        return connection

    return retry_transient(lock)(_NoSession())


class _NoSession:
    """Stands in for a storage in `retry_transient`: there is no scoped session to reset."""

    class scoped_session:
        @staticmethod
        def remove() -> None:
            return None


@contextlib.contextmanager
def _file_lock(url: sqlalchemy.URL, name: str) -> Iterator[None]:
    database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    path = Path(f"{database}.lock")
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
