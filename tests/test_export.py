"""`search export`: every trial of a real study; the JSON loads back into the same trials."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import optuna
import pytest
from study_factory import make_finished_study
from typer.testing import CliRunner

from search import record
from search.cli import app
from search.export import trials_from_json


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path_factory.mktemp('export') / 'study.db'}"
    return url, make_finished_study(url, "exported")


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def test_json_export_round_trips_every_trial(exported, tmp_path: Path) -> None:
    url, study = exported
    out = tmp_path / "trials.json"
    result = CliRunner().invoke(app, ["export", "exported", "--storage", url, "--format",
                                      "json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    loaded = trials_from_json(out.read_text())
    original = study.get_trials()
    assert [t.number for t in loaded] == [t.number for t in original]
    for back, trial in zip(loaded, original, strict=True):
        assert back.state == trial.state
        assert back.params == trial.params and back.distributions == trial.distributions
        assert back.user_attrs == trial.user_attrs
        assert set(back.intermediate_values) == set(trial.intermediate_values)
        assert all(_same(back.intermediate_values[s], v)
                   for s, v in trial.intermediate_values.items())
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert back.value == trial.value
    copy = optuna.create_study(direction="minimize")
    copy.add_trials(loaded)  # valid Optuna trials
    assert copy.best_value == study.best_value


def test_json_export_carries_reasons_and_retry_keys(exported) -> None:
    url, _ = exported
    data = json.loads(CliRunner().invoke(app, ["export", "exported", "--storage", url]).stdout)
    by_number = {t["number"]: t for t in data["trials"]}
    assert by_number[0]["reasons"][record.FAIL_REASON] == "heartbeat-stale"
    assert by_number[1]["reasons"][record.RETRY_OF] == 0
    assert by_number[1]["system_attrs"][record.RETRY_HISTORY] == [0]
    pruned = [t for t in data["trials"] if t["state"] == "PRUNED"]
    assert pruned and all(t["reasons"][record.PRUNE_REASON] for t in pruned)


def test_csv_export_has_one_row_per_trial_with_params_as_columns(exported) -> None:
    url, study = exported
    result = CliRunner().invoke(app, ["export", "exported", "--storage", url, "--format", "csv"])
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials]
    assert {"params_x", "params_lr", "prune_rule", "intermediate_values"} <= set(rows[0])
    complete = next(r for r in rows if r["state"] == "COMPLETE")
    assert len(json.loads(complete["intermediate_values"])) == 6


@pytest.mark.parametrize("args, message", [
    (["exported", "--format", "xml"], "expected csv or json"),
    (["nosuch"], "no study 'nosuch'"),
])
def test_bad_export_input_is_one_error_line(exported, args: list[str], message: str) -> None:
    url, _ = exported
    result = CliRunner().invoke(app, ["export", *args, "--storage", url])
    assert result.exit_code == 2
    assert message in result.output.strip().splitlines()[-1]
