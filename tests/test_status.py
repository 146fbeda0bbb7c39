"""`search status` and the progress bar: read-only, and no number is ever cut."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
from conftest import wait_for
from rich.console import Console
from typer.testing import CliRunner

from search import optuna_compat, record
from search.budget import BudgetState
from search.cli import app
from search.exceptions import StorageError
from search.progress import progress_display
from search.status import render_status, study_status
from search.storage import open_storage, open_storage_read_only

LONG_NAME = "a-study-with-a-really-long-descriptive-name-for-the-lab-2026"


def _row(best: float) -> dict:
    counts = {s.name: 0 for s in optuna.trial.TrialState}
    counts.update(COMPLETE=123456, PRUNED=65432, FAIL=7)
    return {"study": LONG_NAME, "n_trials": 200000, "counts": counts, "best_value": best,
            "best_trial": 3, "best_params": {"lr": 0.000123456}, "trials_per_hour": 1234.5,
            "running": [], "stale": [], "retries": 0, "grace_period": 20}


@pytest.mark.parametrize("width", [40, 60, 80, 200])
def test_status_never_cuts_a_number(width: int) -> None:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False)
    console.print(render_status([_row(0.0890712345)], width=width, one_study=True))
    text = out.getvalue()
    for number in ("0.0890712", "123456", "65432", "200000", "1234.5", "0.000123456"):
        assert number in text, (number, text)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width


@pytest.mark.parametrize("width", [40, 80])
def test_progress_bar_wraps_its_counts_instead_of_cutting_them(width: int, tmp_path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'p.db'}")
    study.add_trial(optuna.trial.create_trial(value=0.0890712345))
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False)
    with progress_display(study, enabled=True, console=console, best_every=0) as update:
        update(BudgetState(n_trials=200000, complete=123456, pruned=65432, failed=7,
                           running=16, waiting=0))
    text = " ".join(out.getvalue().split())
    for part in ("complete 123456", "pruned 65432", "failed 7", "running 16", "best 0.08907",
                 "188888/200000"):
        assert part in text, (part, text)
    assert "…" not in text


def test_read_only_storage_creates_no_table_in_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StorageError, match="holds no Optuna tables"):
        open_storage_read_only(f"sqlite:///{empty}")
    assert empty.stat().st_size == 0


@pytest.mark.postgres
def test_read_only_postgres_session_refuses_writes(pg_url: str, study_name: str) -> None:
    optuna.create_study(storage=open_storage(pg_url), study_name=study_name)
    read_only = open_storage_read_only(pg_url)
    study = optuna.load_study(study_name=study_name, storage=read_only)
    with pytest.raises(optuna.exceptions.StorageInternalError):
        study.set_user_attr("x", 1)
    assert "x" not in optuna.load_study(study_name=study_name, storage=pg_url.replace(
        "postgresql://", "postgresql+psycopg2://")).user_attrs


def test_status_shows_running_trials_with_heartbeat_age_and_stale_ones(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="live")
    study.set_user_attr(record.SPEC, {"metric": "val_loss", "workers": {"grace_period": 2}})
    study.set_user_attr(record.BUDGET, 5)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr(record.HOST, "gpu-box-7")
    trial.set_user_attr(record.DEVICE, "cuda:0")
    trial.report(0.5, 1)
    trial.report(0.4, 2)
    storage.record_heartbeat(optuna_compat.trial_id(trial))
    fresh = study_status(open_storage_read_only(url), "live")
    (running,) = fresh["running"]
    assert (running["host"], running["device"], running["epoch"]) == ("gpu-box-7", "cuda:0", 2)
    assert running["heartbeat_age_s"] is not None and not running["stale"]
    wait_for(lambda: study_status(open_storage_read_only(url), "live")["stale"], 30,
             "the heartbeat to go stale")
    result = CliRunner().invoke(app, ["status", "live", "--storage", url])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "running trial 0 on gpu-box-7 cuda:0, epoch 2, heartbeat" in text
    assert "(stale: > 2 s)" in text


def test_status_lists_every_study_when_none_is_named(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    for name in ("first", "second"):
        optuna.create_study(storage=open_storage(url), study_name=name).add_trial(
            optuna.trial.create_trial(value=1.5))
    result = CliRunner().invoke(app, ["status", "--storage", url, "--json"])
    assert result.exit_code == 0
    import json

    rows = json.loads(result.stdout)
    assert [r["study"] for r in rows] == ["first", "second"]
    assert all(r["counts"]["COMPLETE"] == 1 and r["best_value"] == 1.5 for r in rows)


def test_read_only_opens_a_sqlite_path_with_spaces_and_hashes(tmp_path: Path) -> None:
    folder = tmp_path / "my studies #2"
    folder.mkdir()
    url = f"sqlite:///{folder / 'a b.db'}"
    optuna.create_study(storage=open_storage(url), study_name="spaced").add_trial(
        optuna.trial.create_trial(value=2.5))
    assert study_status(open_storage_read_only(url), "spaced")["best_value"] == 2.5
