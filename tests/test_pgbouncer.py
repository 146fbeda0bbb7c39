"""Workers through a real PgBouncer in transaction mode, in front of the real PostgreSQL.

Transaction pooling hands a server connection to a client for one transaction only, so
anything a worker keeps on its session (session advisory locks, `SET`, prepared statements,
temporary tables) would be lost or leak to another worker. These tests run real `search
worker` processes through a real `pgbouncer` (Debian's package; missing is a failure) with
fewer server connections than the workers' clients, and check the exact budget, nothing left
RUNNING, and recovery from a `kill -9` (reaping and the budget claim run through it too).
Without pgbouncer the test installs it (root on Debian) or fails; it never skips.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy
from conftest import cli_env, sleepy_spec, wait_for
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from system_tools import require

from search.storage import normalize_url, open_storage

pytestmark = pytest.mark.slow

#: Server connections PgBouncer may open to PostgreSQL: fewer than the workers' clients.
SERVER_POOL = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Bouncer:
    """A pgbouncer process in transaction mode on a free port, with its own ini and users."""

    def __init__(self, pg_url: str, folder: Path) -> None:
        binary = require("pgbouncer", "pgbouncer")  # installed when missing, else a failure
        server = make_url(pg_url)
        self.user = server.username or "postgres"
        self.database = server.database or "postgres"
        self.port = _free_port()
        password = f" password={server.password}" if server.password else ""
        folder.mkdir()
        (folder / "users.txt").write_text(f'"{self.user}" ""\n')
        ini = folder / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{self.database} = host={server.host or '127.0.0.1'} port={server.port or 5432} "
            f"dbname={self.database} user={self.user}{password}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
            f"admin_users = {self.user}\npool_mode = transaction\n"
            f"default_pool_size = {SERVER_POOL}\nmax_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits, options\n"
        )
        # PgBouncer refuses to run as root; it reads its ini before dropping to `-u`.
        as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.log_path = folder / "pgbouncer.log"
        self.process = subprocess.Popen(
            [binary, *as_user, str(ini)],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"
        wait_for(self._ready, 20, f"pgbouncer on port {self.port}")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"pgbouncer exited: {self.log_path.read_text()[-2000:]}")
        engine = sqlalchemy.create_engine(normalize_url(self.url), poolclass=sqlalchemy.NullPool)
        try:
            with engine.connect() as connection:
                return connection.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
        except sqlalchemy.exc.OperationalError:
            return False
        finally:
            engine.dispose()

    def admin(self, command: str) -> list[dict[str, object]]:
        """A `SHOW ...` on PgBouncer's admin console, as rows of column -> value."""
        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="pgbouncer"
        )
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(command)
                names = [column.name for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()

    def transactions(self) -> int:
        rows = self.admin("SHOW STATS")
        return sum(int(r["total_xact_count"]) for r in rows if r["database"] == self.database)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def bouncer(pg_url: str, tmp_path: Path) -> Iterator[Bouncer]:
    running = Bouncer(pg_url, tmp_path / "pgbouncer")
    yield running
    running.stop()


def _worker(name: str, url: str, tmp_path: Path, worker_id: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / f"{worker_id}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "search", "worker", name, "--worker-id", worker_id],
        env=cli_env(url, SEARCH_TEST_EPOCH_SECONDS="0.2"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _states(url: str, name: str) -> Counter[TrialState]:
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def _reported_epochs(url: str, name: str) -> int:
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    return sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))


def _running_with_an_epoch(url: str, name: str) -> bool:
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    return any(
        t.state == TrialState.RUNNING and t.intermediate_values
        for t in study.get_trials(deepcopy=False)
    )


def test_workers_behind_transaction_pooling_meet_the_exact_budget_after_a_kill(
    bouncer: Bouncer, pg_url: str, study_name: str, tmp_path: Path, write_spec
) -> None:
    n_trials = 8
    spec = write_spec(sleepy_spec(study_name, n_trials=n_trials, epochs=3))
    subprocess.run(
        [sys.executable, "-m", "search", "create", str(spec)],
        env=cli_env(bouncer.url), check=True, capture_output=True,
    )
    # A first worker alone is killed -9 in the middle of a trial; three more then share the
    # study through the bouncer, reap the dead trial, retry it and meet the budget.
    first = _worker(study_name, bouncer.url, tmp_path, "w0")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: _running_with_an_epoch(pg_url, study_name), 90, "a trial with an epoch")
        first.send_signal(signal.SIGKILL)
        first.wait()
        workers = [_worker(study_name, bouncer.url, tmp_path, f"w{i}") for i in (1, 2, 3)]
        for i, worker in enumerate(workers, start=1):
            worker.wait(timeout=180)
            assert worker.returncode == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    finally:
        for process in (first, *workers):
            if process.poll() is None:
                process.kill()
                process.wait()
    states = _states(pg_url, study_name)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n_trials, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    assert states[TrialState.FAIL] >= 1, states  # the killed worker's trial, reaped
    # Every report went through PgBouncer, over at most SERVER_POOL server connections.
    assert bouncer.transactions() >= _reported_epochs(pg_url, study_name)
    pools = [p for p in bouncer.admin("SHOW POOLS") if p["database"] == bouncer.database]
    assert pools and all(p["pool_mode"] == "transaction" for p in pools), pools
