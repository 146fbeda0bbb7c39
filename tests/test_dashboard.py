"""`search dashboard`: the real optuna-dashboard behind the guard, served by a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import cli_env
from study_factory import make_finished_study

from search import record
from search.dashboard import Guard, dashboard_app, make_dashboard_server
from search.storage import open_storage, open_storage_read_only

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'study.db'}"
    make_finished_study(url, "reviewed")
    return url, "reviewed"


def _serve(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "search", "dashboard", *args, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the server listens (or exits)
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        yield process, f"http://127.0.0.1:{match.group(1)}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(finished: tuple[str, str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    yield from _serve(finished[1], "--storage", finished[0], "--token", TOKEN)


def _call(url: str, method: str = "GET", token: str | None = TOKEN, data: bytes | None = None
          ) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _study_detail(base: str, storage_url: str, name: str) -> dict:
    study_id = open_storage_read_only(storage_url).get_study_id_from_name(name)
    code, body = _call(f"{base}/api/studies/{study_id}?after=0")
    assert code == 200, body
    return json.loads(body)


def test_dashboard_lists_the_study_with_its_metric_name(served, finished) -> None:
    _, base = served
    code, body = _call(f"{base}/api/studies")
    assert code == 200
    summaries = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in summaries] == [finished[1]]
    detail = _study_detail(base, *finished)
    assert detail["objective_names"] == ["val_loss"]
    code, page = _call(f"{base}/dashboard")  # the web UI itself, under the same guard
    assert code == 200 and b"<html" in page.lower()


def test_dashboard_shows_reasons_retries_and_every_epoch_in_user_attrs(served, finished) -> None:
    _, base = served
    trials = _study_detail(base, *finished)["trials"]
    attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in trials]
    pruned = [a for a in attrs if record.PRUNE_RULE in a]
    assert pruned and all(a[record.PRUNE_REASON] for a in pruned)
    assert any(a.get(record.FAIL_REASON) == "heartbeat-stale" for a in attrs)
    retry = next(a for a in attrs if record.RETRY_OF in a)
    assert retry[record.RETRY_REASON] == "heartbeat-stale"
    complete = next(a for t, a in zip(trials, attrs, strict=True) if t["state"] == "Complete")
    epochs = json.loads(complete[record.EPOCH_METRICS].replace("'", '"'))
    assert [row["epoch"] for row in epochs] == [1, 2, 3, 4, 5, 6]  # nothing cut at 1,024 chars


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_read_only_dashboard_refuses_writes(served, finished, method: str) -> None:
    _, base = served
    study_id = open_storage_read_only(finished[0]).get_study_id_from_name(finished[1])
    code, body = _call(f"{base}/api/studies/{study_id}", method, data=b"{}")
    assert code == 403 and b"read-only" in body
    code, _ = _call(f"{base}/api/studies/{study_id}/note", method, data=b'{"body": "x"}')
    assert code == 403
    assert [s.study_name for s in optuna.get_all_study_summaries(
        open_storage_read_only(finished[0]))] == [finished[1]]


def test_wrong_or_missing_token_is_refused(served) -> None:
    _, base = served
    assert _call(f"{base}/api/studies", token="wrong")[0] == 401
    assert _call(f"{base}/api/studies", token=None)[0] == 401
    assert _call(f"{base}/api/studies", "DELETE", token="wrong")[0] == 401
    with urllib.request.urlopen(f"{base}/api/studies?token={TOKEN}", timeout=30) as response:
        assert response.status == 200
        assert "search_dashboard_token=" in response.headers["Set-Cookie"]


def test_read_only_database_refuses_a_write_the_guard_lets_through(pg_url: str,
                                                                   study_name: str) -> None:
    """Even with the guard open (allow_writes), a read-only PostgreSQL session cannot delete."""
    study = optuna.create_study(storage=open_storage(pg_url), study_name=study_name)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    storage = open_storage_read_only(pg_url)
    server = make_dashboard_server(dashboard_app(storage, allow_writes=True), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        study_id = storage.get_study_id_from_name(study_name)
        base = f"http://127.0.0.1:{server.server_port}"
        code, body = _call(f"{base}/api/studies/{study_id}?after=0", token=None)
        assert code == 200 and len(json.loads(body)["trials"]) == 2  # reading works
        code, _ = _call(f"{base}/api/studies/{study_id}", "DELETE", token=None)
        assert code >= 400
    finally:
        server.shutdown()
        server.server_close()
    assert len(optuna.load_study(study_name=study_name, storage=open_storage(pg_url)).trials) == 2


def test_allow_writes_pushes_the_pruning_plot_into_the_dashboard(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    make_finished_study(url, "writable")
    served = _serve("writable", "--storage", url, "--allow-writes")
    _, base = next(served)
    try:
        detail = _study_detail(base, url, "writable")
        assert [g["id"] for g in detail["plotly_graph_objects"]] == ["search-curves"]
        study_id = open_storage_read_only(url).get_study_id_from_name("writable")
        code, _ = _call(f"{base}/api/studies/{study_id}/note", "PUT", token=None,
                        data=b'{"version": 1, "body": "reviewed"}')
        assert code == 204
    finally:
        served.close()


def test_guard_rejects_an_empty_token() -> None:
    with pytest.raises(ValueError, match="token"):
        Guard(lambda e, s: [], token="")


def test_dashboard_on_a_missing_sqlite_file_is_one_line_and_creates_nothing(tmp_path: Path
                                                                           ) -> None:
    result = subprocess.run([sys.executable, "-m", "search", "dashboard", "--storage",
                             f"sqlite:///{tmp_path / 'typo.db'}"], capture_output=True,
                            text=True, env=cli_env(), timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("Error: no SQLite file")
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
