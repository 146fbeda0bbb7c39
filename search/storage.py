"""Storage URLs, engines, heartbeats and the retrying Optuna storage every process uses.

The whole state of a study lives in the database named by one URL: an embedded SQLite file by
default, PostgreSQL for many machines. A URL is only ever shown through `mask_url`.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
import sqlalchemy.pool
from sqlalchemy.engine import make_url

from search import config, epochs, optuna_compat
from search.config import CONNECT_TIMEOUT_ENV as CONNECT_TIMEOUT_ENV  # re-exported
from search.config import DEFAULT_STORAGE as DEFAULT_STORAGE
from search.config import STORAGE_ENV as STORAGE_ENV
from search.exceptions import StorageError
from search.transient import reason_of, retry_transient

logger = logging.getLogger(__name__)

#: Connections one worker holds: one, shared in turn by its main loop, heartbeat and reaper
#: threads (each storage call is one short transaction; none nests another).
POOL_SIZE = 1
POOL_OVERFLOW = 0

_FATAL_MARKERS = (
    "password authentication failed",
    "does not exist",
    "no password supplied",
    "permission denied",
)


def resolve_storage_url(cli: str | None = None, spec: str | None = None) -> str:
    """The storage URL by precedence: CLI flag > `SEARCH_STORAGE` > study file > default."""
    return config.storage_url(cli, spec)


def normalize_url(url: str) -> str:
    """Pin `postgresql://` to the psycopg2 driver (SQLAlchemy 2.1 would pick psycopg 3)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def describe_url(url: str) -> str:
    """`host:port/database` for servers, the file path for SQLite; never a password."""
    try:
        parsed = make_url(url)
    except Exception:
        return "<unparseable storage URL>"
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite file {parsed.database or ':memory:'}"
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    connect_timeout: float | None = None,
    create: bool = True,
) -> ResilientRDBStorage:
    """Open the storage at `url`, retrying with backoff while the server is starting.

    A refused or timed-out connection is retried for `connect_timeout` seconds (default
    `SEARCH_CONNECT_TIMEOUT` or 30); bad credentials or a missing database fail at once.
    `create=False` (a worker, which only joins a study): a missing SQLite file is an error,
    not a new empty database.

    Raises:
        StorageError: the database cannot be reached or used; the message names host, port
            and database and never the password.
    """
    try:
        backend = make_url(url).get_backend_name()
        engine_url = normalize_url(url)
    except Exception as e:
        raise StorageError(
            f"invalid storage URL {mask_url(url)!r}: expected sqlite:///FILE or "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from e
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(f"unsupported storage {backend!r}: use sqlite:/// or postgresql://")
    # No pre-ping (a round trip per call): a dropped connection fails its call, which is
    # retried on a new connection (`retry_transient`).
    engine_kwargs: dict[str, Any] = {}
    engine_kwargs.update(pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_timeout=60)
    if backend == "sqlite":
        _prepare_sqlite(url, create=create)
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        # Named per process, so an operator (or a test) sees which worker holds a connection.
        name = f"search {socket.gethostname()}:{os.getpid()}"[:63]
        engine_kwargs["connect_args"] = {"connect_timeout": 10, "application_name": name}
    deadline = time.monotonic() + config.connect_timeout(connect_timeout)
    delay = 0.5
    while True:
        try:
            # Optuna's schema set-up and check hold a session while opening a second
            # connection; with one connection per process both are done apart, first.
            _initialize_schema(engine_url, engine_kwargs["connect_args"])
            storage = ResilientRDBStorage(
                engine_url,
                engine_kwargs=engine_kwargs,
                skip_compatibility_check=True,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=stale_trial_callback,
            )
            problem = optuna_compat.schema_problem(storage)
            if problem:
                raise StorageError(f"storage {mask_url(url)}: {problem}")
            return storage
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            reason = reason_of(e)
            if _is_fatal(reason) or time.monotonic() + delay > deadline:
                raise StorageError(
                    f"cannot open storage {mask_url(url)} ({describe_url(url)}): {reason}. "
                    f"Is the database running and the URL right? "
                    'Try `search status --storage "$SEARCH_STORAGE"` with SEARCH_STORAGE set to it'
                ) from None
            logger.warning(
                "Storage %s not ready (%s); retrying in %.1f s.", describe_url(url), reason, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _initialize_schema(engine_url: str, connect_args: dict[str, Any]) -> None:
    """Create Optuna's tables and this service's in a new database with a throwaway, unpooled
    engine, one process at a time (`epochs.schema_lock`): workers started together on a new
    PostgreSQL database would otherwise race on its catalog."""
    kwargs = {"poolclass": sqlalchemy.pool.NullPool, "connect_args": connect_args}
    engine = sqlalchemy.create_engine(engine_url, **kwargs)
    try:
        with epochs.schema_lock(engine) as connection:
            if not sqlalchemy.inspect(connection).has_table("alembic_version"):
                optuna.storages.RDBStorage(engine_url, engine_kwargs=kwargs)
            epochs.create_tables(connection)
    finally:
        engine.dispose()


def _prepare_sqlite(url: str, *, create: bool) -> None:
    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database)
    if not create and not path.is_file():
        raise _missing_sqlite_file(url, database)
    if path.parent and not path.parent.exists():
        raise StorageError(
            f"cannot create SQLite file {path}: folder {path.parent} does not exist"
        )
    try:
        with sqlite3.connect(path, timeout=60) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as e:
        raise StorageError(f"cannot open SQLite file {path}: {e}") from e


def _missing_sqlite_file(url: str, database: str | None) -> StorageError:
    return StorageError(
        f"no SQLite file {database or ':memory:'}: check the path in {mask_url(url)!r} "
        "(nothing was created)"
    )


def _is_fatal(reason: str) -> bool:
    return any(marker in reason for marker in _FATAL_MARKERS)


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose calls survive dropped connections and short outages.

    Each call that fails with a connection error is retried with backoff for up to two minutes
    (`pg_terminate_backend`, a PostgreSQL restart, a network blip) instead of killing the worker.
    """


#: Every RDBStorage method a worker or launcher reaches, Optuna's cache's own calls included
#: (`tests/test_storage.py` checks this against the installed Optuna's cache).
RETRIED_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "_create_new_trial",
    "set_trial_param",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "_get_trials",
    "get_best_trial",
    "_get_best_trial_id",
    "record_heartbeat",
    "_get_stale_trial_ids",
)
for _name in RETRIED_METHODS:
    setattr(
        ResilientRDBStorage, _name, retry_transient(getattr(optuna.storages.RDBStorage, _name))
    )


def open_storage_read_only(url: str) -> optuna.storages.RDBStorage:
    """Open the storage at `url` for reading only: no file, no table, no migration is made.

    SQLite is opened with `mode=ro` (a missing file is an error, not a new database);
    PostgreSQL sessions run with `default_transaction_read_only=on`, so even a reviewer's
    mistake cannot write. The schema is never created nor migrated.

    Raises:
        StorageError: the URL is invalid, the SQLite file is missing, the database cannot be
            reached, or it holds no Optuna tables; one line, never the password.
    """
    import urllib.parse

    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        engine_url = make_url(normalize_url(url))
    except Exception as e:
        raise StorageError(
            f"invalid storage URL {mask_url(url)!r}: expected sqlite:///FILE or "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from e
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:" or not Path(database).is_file():
            raise _missing_sqlite_file(url, database)
        path = urllib.parse.quote(str(Path(database).resolve()))  # a URI: spaces, #, ? escaped
        engine_url = engine_url.set(database=f"file:{path}?mode=ro", query={"uri": "true"})
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif backend == "postgresql":
        engine_kwargs["connect_args"] = {
            "connect_timeout": 10,
            "options": "-c default_transaction_read_only=on",
        }
        engine_kwargs.update(pool_size=2, max_overflow=2)
    else:
        raise StorageError(f"unsupported storage {backend!r}: use sqlite:/// or postgresql://")
    try:
        return optuna.storages.RDBStorage(
            engine_url.render_as_string(hide_password=False),
            engine_kwargs=engine_kwargs,
            skip_table_creation=True,
        )
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        reason = reason_of(e)
        if "version_info" in reason or "no such table" in reason:
            reason = "it holds no Optuna tables (no study was ever created there)"
        raise StorageError(
            f"cannot open storage {mask_url(url)} ({describe_url(url)}): {reason}. "
            "Is the database running and the URL right?"
        ) from None
    except RuntimeError as e:  # Optuna: the schema is older or newer than this Optuna's
        raise StorageError(f"cannot read storage {mask_url(url)}: {e}") from None
