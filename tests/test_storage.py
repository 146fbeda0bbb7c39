"""Storage: URL precedence, masking, clear connection errors, retry while a server starts."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
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


def test_unreachable_postgres_is_one_clear_line_without_password() -> None:
    url = f"postgresql://alice:{SECRET}@127.0.0.1:1/hpo"
    with pytest.raises(StorageError) as info:
        open_storage(url, connect_timeout=1)
    message = str(info.value)
    assert "127.0.0.1:1/hpo" in message
    assert "Connection refused" in message or "connection refused" in message
    assert SECRET not in message and "\n" not in message
    assert "search status --storage" in message


def test_wrong_credentials_fail_at_once_without_password(pg_url: str) -> None:
    # The local server trusts every known role (no password check), so a wrong credential is
    # an unknown role here; the code path is the same FATAL authentication failure.
    url = make_url(pg_url).set(username="no_such_role", password=SECRET)
    rendered = url.render_as_string(hide_password=False)
    began = time.monotonic()
    with pytest.raises(StorageError) as info:
        open_storage(rendered, connect_timeout=20)
    assert time.monotonic() - began < 10, "a credential error must not be retried"
    assert 'role "no_such_role" does not exist' in str(info.value)
    assert SECRET not in str(info.value)


def test_missing_database_is_named(pg_url: str) -> None:
    url = make_url(pg_url).set(database="no_such_db").render_as_string(hide_password=False)
    with pytest.raises(StorageError, match='database "no_such_db" does not exist'):
        open_storage(url, connect_timeout=20)


def test_database_that_starts_late_is_waited_for(pg_url: str) -> None:
    target = make_url(pg_url)
    proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432))
    late = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    timer = threading.Timer(2.0, proxy.start)
    timer.start()
    try:
        began = time.monotonic()
        storage = open_storage(late, connect_timeout=30)
        assert time.monotonic() - began >= 1.5
        assert storage.get_all_studies() is not None
    finally:
        timer.cancel()
        proxy.stop()


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(StorageError, match="unsupported storage 'mysql'"):
        open_storage("mysql://u:p@h/db")
