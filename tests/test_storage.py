"""Storage: URL precedence, masking, clear connection errors, retry while a server starts."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from search.exceptions import StorageError
from search.storage import (
    DEFAULT_STORAGE,
    ResilientRDBStorage,
    describe_url,
    mask_url,
    open_storage,
    resolve_storage_url,
)

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("cli", "env", "spec", "expected"),
    [
        ("sqlite:///cli.db", "sqlite:///env.db", "sqlite:///spec.db", "sqlite:///cli.db"),
        (None, "sqlite:///env.db", "sqlite:///spec.db", "sqlite:///env.db"),
        (None, None, "sqlite:///spec.db", "sqlite:///spec.db"),
        (None, None, None, DEFAULT_STORAGE),
    ],
)
def test_storage_url_precedence(monkeypatch: pytest.MonkeyPatch, cli: str | None,
                                env: str | None, spec: str | None, expected: str) -> None:
    if env is None:
        monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    else:
        monkeypatch.setenv("SEARCH_STORAGE", env)
    assert resolve_storage_url(cli, spec) == expected


def test_mask_url_hides_the_password() -> None:
    masked = mask_url(f"postgresql://alice:{SECRET}@db.example:5433/hpo")
    assert SECRET not in masked
    assert masked == "postgresql://alice:***@db.example:5433/hpo"
    described = describe_url(f"postgresql://alice:{SECRET}@db.example:5433/hpo")
    assert described == "db.example:5433/hpo"


def test_sqlite_file_is_created_in_wal_mode(tmp_path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(storage, ResilientRDBStorage)
    optuna.create_study(storage=storage, study_name="a")
    assert (tmp_path / "x.db").exists()
    with contextlib.closing(sqlite3.connect(tmp_path / "x.db")) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_unreachable_postgres_is_one_clear_line_without_password() -> None:
    url = f"postgresql://alice:{SECRET}@127.0.0.1:1/hpo"
    with pytest.raises(StorageError) as info:
        open_storage(url, connect_timeout=1)
    message = str(info.value)
    assert "127.0.0.1:1/hpo" in message
    assert "Connection refused" in message or "connection refused" in message
    assert SECRET not in message and "\n" not in message
    assert "search status --storage" in message
    hint = message.split("Try ", 1)[1]
    assert "***" not in hint and "127.0.0.1" not in hint, "the hint runs as printed"


def test_wrong_credentials_fail_at_once_without_password(
        pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # The local server trusts every known role (no password check), so a wrong credential is
    # an unknown role here; the code path is the same FATAL authentication failure.
    url = make_url(pg_url).set(username="no_such_role", password=SECRET)
    rendered = url.render_as_string(hide_password=False)
    with caplog.at_level(logging.WARNING, logger="search.storage"), \
            pytest.raises(StorageError) as info:
        open_storage(rendered, connect_timeout=20)
    assert "retrying" not in caplog.text, "a credential error must not be retried"
    assert 'role "no_such_role" does not exist' in str(info.value)
    assert SECRET not in str(info.value)


def test_missing_database_is_named(pg_url: str) -> None:
    url = make_url(pg_url).set(database="no_such_db").render_as_string(hide_password=False)
    with pytest.raises(StorageError, match='database "no_such_db" does not exist'):
        open_storage(url, connect_timeout=20)


class _StartOnRetry(logging.Handler):
    """Starts the database (the proxy in front of it) once `open_storage` says it will retry."""

    def __init__(self, proxy: TcpProxy) -> None:
        super().__init__(logging.WARNING)
        self.proxy, self.retries = proxy, 0

    def emit(self, record: logging.LogRecord) -> None:
        if "not ready" in record.getMessage():
            self.retries += 1
            if self.retries == 1:
                self.proxy.start()


def test_database_that_starts_late_is_waited_for(pg_url: str) -> None:
    target = make_url(pg_url)
    proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432))
    late = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    starter = _StartOnRetry(proxy)
    logging.getLogger("search.storage").addHandler(starter)
    try:
        storage = open_storage(late, connect_timeout=30)
        assert starter.retries >= 1, "the first attempt found no database and was retried"
        assert storage.get_all_studies() is not None
    finally:
        logging.getLogger("search.storage").removeHandler(starter)
        proxy.stop()


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(StorageError, match="unsupported storage 'mysql'"):
        open_storage("mysql://u:p@h/db")


def test_every_backend_call_of_optunas_cache_is_retried() -> None:
    from search.optuna_compat import cached_backend_calls
    from search.storage import RETRIED_METHODS

    skipped = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}  # no I/O
    assert cached_backend_calls() - skipped <= set(RETRIED_METHODS)
    for name in RETRIED_METHODS:
        assert getattr(ResilientRDBStorage, name) is not getattr(
            optuna.storages.RDBStorage, name), f"{name} is not wrapped"


@pytest.fixture
def new_database(pg_url: str):
    """The URL of a database of its own on the real server, with no table yet."""
    import uuid

    import sqlalchemy
    from conftest import _create_database

    from search.storage import normalize_url

    database = f"new_{uuid.uuid4().hex[:8]}"
    url = make_url(pg_url).set(database=database).render_as_string(hide_password=False)
    _create_database(url)
    yield url
    admin = sqlalchemy.create_engine(normalize_url(pg_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    admin.dispose()


def _at_once(count: int, call) -> list[str]:
    """Run `call(i)` in threads i = 0..count-1 released together; the errors they raised."""
    import threading

    barrier, errors = threading.Barrier(count), []

    def run(i: int) -> None:
        barrier.wait()
        try:
            call(i)
        except Exception as e:  # every error is the finding
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_workers_opening_a_new_database_at_once_take_turns_creating_its_tables(
        new_database: str, caplog: pytest.LogCaptureFixture) -> None:
    """8 processes' first `open_storage` at the same moment (a Slurm array, a Ray cluster):
    PostgreSQL fails concurrent CREATE TABLEs of one name on its catalog, so without the
    schema lock all but one would hit a duplicate key and retry (Optuna's tables) or die
    (the epochs table, as a worker of the connection-storm test once did)."""
    import sqlalchemy

    from search.epochs import EPOCHS
    from search.storage import normalize_url

    with caplog.at_level(logging.WARNING, logger="search.storage"):
        errors = _at_once(8, lambda _: open_storage(new_database, connect_timeout=20))
    assert errors == []
    assert "not ready" not in caplog.text, "no process had to retry"
    engine = sqlalchemy.create_engine(normalize_url(new_database))
    tables = set(sqlalchemy.inspect(engine).get_table_names())
    engine.dispose()
    assert {"studies", "trials", "alembic_version", EPOCHS.name} <= tables


def test_the_epochs_table_is_added_at_once_to_a_database_optuna_made(new_database: str) -> None:
    """A database made by plain Optuna has no epochs table; 8 writers add it together."""
    from search.epochs import ensure_table
    from search.storage import normalize_url

    storages = [optuna.storages.RDBStorage(normalize_url(new_database)) for _ in range(8)]
    assert _at_once(8, lambda i: ensure_table(storages[i])) == []


@pytest.mark.slow
def test_a_connection_storm_kills_no_launcher_and_no_worker(
        pg_url: str, new_database: str, study_name: str, write_spec, tmp_path) -> None:
    """Every backend of the study's database is terminated every 2 s for 20 s."""
    import subprocess
    import sys

    import sqlalchemy
    from conftest import cli_env, sleepy_spec

    from search.storage import normalize_url

    admin = sqlalchemy.create_engine(normalize_url(pg_url), isolation_level="AUTOCOMMIT")
    url = new_database
    database = make_url(url).database
    spec = write_spec(sleepy_spec(study_name, n_trials=14, epochs=3))
    env = cli_env(url, SEARCH_TEST_EPOCH_SECONDS="0.4")
    logs = [(tmp_path / f"p{i}.log").open("w") for i in range(3)]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "search", "launch", str(spec), "--workers", "2", "--no-progress",
         "--log-dir", str(tmp_path / "logs")], env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _has_study(url, study_name) and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [subprocess.Popen([sys.executable, "-m", "search", "worker", study_name],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
                   for log in logs[1:]]
        storm_ends = time.monotonic() + 20
        terminated = 0
        while time.monotonic() < storm_ends:
            with admin.connect() as connection:
                terminated += connection.execute(sqlalchemy.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database}).scalar()
            time.sleep(2)
        codes = [p.wait(timeout=240) for p in (launcher, *workers)]
        outputs = [(tmp_path / f"p{i}.log").read_text()[-3000:] for i in range(3)]
        assert terminated >= 10, "the storm hit the processes"
        assert codes == [0, 0, 0], outputs
        states = Counter(t.state for t in optuna.load_study(
            study_name=study_name, storage=open_storage(url)).trials)
        assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 14, states
        assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0, states
    finally:
        for process in (launcher, *locals().get("workers", [])):
            if process.poll() is None:
                process.kill()
        admin.dispose()


def _has_study(url: str, name: str) -> bool:
    try:
        return any(s.study_name == name for s in open_storage(url).get_all_studies())
    except StorageError:
        return False
