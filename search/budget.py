"""The study's trial budget, counted in the database and claimed under a lock.

Exactly `n_trials` trials must finish (COMPLETE + PRUNED) however many workers run. A worker
may start a trial only while the trials that can still finish (finished, running and waiting)
number fewer than the budget; that check and the `ask` that follows happen under one
study-wide lock, so two workers can never claim the last slot together. The lock is a
PostgreSQL advisory lock (released by the server if its holder dies) or, for the embedded
SQLite file, an OS file lock beside the database file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

logger = logging.getLogger(__name__)

BUDGET_ATTR = "n_trials"


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
    """Count the study's trials per state against the budget stored on the study."""
    counts = Counter(t.state for t in study.get_trials(deepcopy=False))
    return BudgetState(
        n_trials=int(study.user_attrs.get(BUDGET_ATTR, 0)),
        complete=counts[TrialState.COMPLETE],
        pruned=counts[TrialState.PRUNED],
        failed=counts[TrialState.FAIL],
        running=counts[TrialState.RUNNING],
        waiting=counts[TrialState.WAITING],
    )


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Hold the study-wide lock that guards budget claims and reaping."""
    storage = getattr(study._storage, "_backend", study._storage)  # unwrap Optuna's cache
    engine = getattr(storage, "engine", None)
    if engine is None:
        raise TypeError(f"the budget lock needs an RDB storage, got {type(storage).__name__}")
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, study.study_name):
            yield
    else:
        with _file_lock(engine.url, study.study_name):
            yield


@contextlib.contextmanager
def _advisory_lock(engine: sqlalchemy.Engine, name: str) -> Iterator[None]:
    key = int.from_bytes(hashlib.sha1(f"search:{name}".encode()).digest()[:8], "big", signed=True)
    with engine.connect() as connection:
        # A transaction-level lock: released when this connection's transaction ends, even if
        # the connection dies or sits behind a transaction-pooling PgBouncer.
        connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                connection.rollback()


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
