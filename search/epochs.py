"""Per-epoch metrics: one row per epoch, written with the objective's intermediate value.

Each `report(step, metrics)` is one transaction that writes Optuna's intermediate value and
one row of this service's own table `search_epoch_metrics` (trial id, epoch, the metrics as
JSON): the same cost at epoch 1 and epoch 500. When a trial ends, its rows are copied once
into the trial's `epoch_metrics` user attribute, where optuna-dashboard and `optuna trials`
show them; a crashed trial's rows are copied by whoever fails it. A crash loses at most the
report of the epoch that was being written.

The table is made with Optuna's own by `search.storage.open_storage`, under `schema_lock`:
processes that open a new PostgreSQL database at once take turns, since two concurrent
`CREATE TABLE`s of one name fail on the server's catalog even with `IF NOT EXISTS`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import optuna
import sqlalchemy as sa

from search import optuna_compat
from search.transient import retry_transient

METADATA = sa.MetaData()
EPOCHS = sa.Table(
    "search_epoch_metrics",
    METADATA,
    sa.Column("trial_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("epoch", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("metrics", sa.Text, nullable=False),
)


#: Key of the PostgreSQL advisory lock held while a process creates tables (any constant
#: that every process shares; "search" in hex-speak).
SCHEMA_LOCK_KEY = 0x5EA4C4


@contextlib.contextmanager
def schema_lock(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction on `engine` in which no other process creates tables: on PostgreSQL
    it holds an advisory lock until it commits; SQLite's file lock already serializes DDL."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
        yield connection


def create_tables(connection: sa.Connection) -> None:
    """Create this service's tables where missing (call it inside `schema_lock`)."""
    METADATA.create_all(connection, checkfirst=True)


@retry_transient
def ensure_table(storage: optuna.storages.BaseStorage) -> None:
    """Create the table if it is missing (writers only; readers cope without it);
    `open_storage` has done so for every storage it opened."""
    with schema_lock(optuna_compat.engine_of(storage)) as connection:
        create_tables(connection)


@retry_transient
def record_epoch(
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    step: int,
    value: float,
    row: dict[str, float],
) -> None:
    """Write the objective's intermediate value and the epoch's row in one transaction.

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: the trial was finished by someone else.
    """
    with optuna_compat.session(storage) as opened:
        optuna_compat.write_intermediate(opened, storage, trial_id, step, value)
        text = json.dumps(row)  # NaN/inf as JSON's NaN/Infinity, as Optuna writes attrs
        row_of_epoch = {"trial_id": trial_id, "epoch": step, "metrics": text}
        optuna_compat.upsert(opened, EPOCHS, row_of_epoch, ["trial_id", "epoch"])


@retry_transient
def stored_rows(storage: optuna.storages.BaseStorage, trial_id: int) -> list[dict[str, Any]]:
    """The rows recorded for `trial_id`, oldest first (empty if the table does not exist)."""
    engine = optuna_compat.engine_of(storage)
    if not sa.inspect(engine).has_table(EPOCHS.name):
        return []
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(EPOCHS.c.metrics)
            .where(EPOCHS.c.trial_id == trial_id)
            .order_by(EPOCHS.c.epoch)
        )
        return [json.loads(text) for (text,) in rows]
