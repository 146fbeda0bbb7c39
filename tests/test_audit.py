"""`search audit`: a real study's recorded curves replayed through other pruner settings."""

from __future__ import annotations

import json

import optuna
import pytest
from study_factory import make_finished_study
from typer.testing import CliRunner

from search.audit import AuditError, audit, parse_setting
from search.cli import app


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path_factory.mktemp('audit') / 'study.db'}"
    return url, make_finished_study(url, "audited")


def test_replaying_the_own_curve_rules_prunes_what_they_pruned(audited) -> None:
    _, study = audited
    happened, own, default = audit(study, ["default:comparative=none", "default"])
    diverged = {n: v for n, v in happened.pruned.items() if v["rule"] == "non-finite"}
    assert diverged  # the study has NaN trials (x > 0.6)
    assert own.pruned == diverged  # same trials, same epoch, same rule
    assert diverged.items() <= default.pruned.items()
    assert own.epochs == happened.epochs  # the rest run to the end of their record


def test_the_studys_own_setting_replays_exactly_what_its_single_worker_did(audited) -> None:
    """The study ran with the default pruner on one worker, whose peers hold every trial
    before the current one; the replay compares alike (each trial counted as it is told),
    so it prunes the same trials at the same epochs by the same rules, and observes all."""
    _, study = audited
    happened, default = audit(study, ["default"])
    assert any(v["rule"] == "comparative" for v in happened.pruned.values())
    assert default.pruned == happened.pruned
    assert default.unobserved == []


def test_no_pruner_prunes_nothing_and_marks_the_unrecorded_epochs(audited) -> None:
    _, study = audited
    happened, none = audit(study, ["none"])
    assert none.pruned == {}
    assert sorted(none.unobserved) == sorted(happened.pruned)  # their tail was never run
    assert none.epochs == happened.epochs  # lower bound: only what was recorded
    assert none.best_survives is True


def test_aggressive_setting_prunes_more_and_spends_less(audited) -> None:
    _, study = audited
    happened, strict = audit(study, ["percentile:percentile=10.0,n_startup_trials=1"])
    assert len(strict.pruned) > len(happened.pruned)
    assert strict.epochs < happened.epochs and strict.seconds < happened.seconds
    assert all(v["rule"] for v in strict.pruned.values())


def test_parse_setting_reads_yaml_values() -> None:
    assert parse_setting("default:divergence_margin=0.5,rules=[non-finite]") == (
        "default", {"divergence_margin": 0.5, "rules": ["non-finite"]})
    with pytest.raises(AuditError, match="expected NAME:key=value"):
        parse_setting("median:oops")


def test_audit_command_json_and_bad_setting(audited) -> None:
    url, _ = audited
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "audited", "--storage", url, "--pruner", "median",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert [r["setting"] for r in json.loads(result.stdout)] == ["actual", "median"]
    table = runner.invoke(app, ["audit", "audited", "--storage", url])
    assert table.exit_code == 0 and "best survives" in table.stdout
    bad = runner.invoke(app, ["audit", "audited", "--storage", url, "--pruner", "nope"])
    assert bad.exit_code == 2
    assert len(bad.output.strip().splitlines()) == 1
    assert bad.output.startswith("Error: --pruner 'nope': unknown pruner 'nope'")


def test_a_trial_the_setting_ends_at_its_best_is_not_counted_pruned(sqlite_url: str) -> None:
    """The study's best overfits after epoch 6 (val rises while train_loss falls): the
    default setting ends it there at its best, so the best survives; before, the replay
    counted every stop as a prune."""
    from optuna.trial import create_trial

    from search import record

    study = optuna.create_study(storage=sqlite_url)

    def add(val: list[float], train: list[float], **attrs: object) -> None:
        rows = [{"epoch": e + 1, "val_loss": v, "train_loss": t}
                for e, (v, t) in enumerate(zip(val, train, strict=True))]
        curve = {r["epoch"]: r["val_loss"] for r in rows}
        attrs = {record.EPOCH_METRICS: rows, **attrs}
        study.add_trial(create_trial(value=min(val), user_attrs=attrs, intermediate_values=curve))

    for i in range(6):
        falling = [2.0 * (0.5 + 0.05 * i) ** (e / 11) for e in range(12)]
        add(falling, falling)
    overfit = [2.0, 1.2, 0.8, 0.5, 0.3, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    add(overfit, [2.0, 1.2, 0.8, 0.5, 0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.04],
        **{record.OUTCOME: "ended", record.PRUNE_RULE: "overfitting"})
    happened, default = audit(study, ["default"])
    assert happened.ended == {6: {"epoch": 12, "rule": "overfitting"}}
    assert default.ended[6]["rule"] == "overfitting" and 6 not in default.pruned
    assert default.ended[6]["epoch"] < 12 and default.best_survives is True
