"""`search audit`: replay a finished study's recorded curves through other pruner settings.

Each setting (`median`, `default:divergence_margin=0.5`, ... built by `make_pruner`) gets a
fresh in-memory study. The recorded trials are replayed in the order they were run, epoch by
epoch (the intermediate values and the `epoch_metrics` rows), through the Optuna contract
`trial.report` / `trial.should_prune()`; a trial the setting prunes stops there. The audit
tells, per setting: which trials it prunes and at which epoch, whether the study's best trial
survives, and the epochs and GPU-time (recorded `epoch_seconds`) it spends.

What was not recorded cannot be replayed: a trial that was pruned in the real study but that a
setting would let run is replayed up to its last recorded epoch and counted as `unobserved`
(its epochs and seconds are then lower bounds).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Group, RenderableType

from search import record
from search.exceptions import SearchError
from search.pruning import make_pruner
from search.report import trial_seconds

ACTUAL = "actual"


class AuditError(SearchError):
    """A `--pruner` setting cannot be built."""


@dataclass
class SettingResult:
    """What one pruner setting would have done with the recorded trials."""

    setting: str
    pruned: dict[int, dict[str, Any]] = field(default_factory=dict)  # number -> epoch, rule
    epochs: int = 0
    seconds: float = 0.0
    unobserved: list[int] = field(default_factory=list)
    best_survives: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pruned"] = {str(k): v for k, v in self.pruned.items()}
        return data


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME` or `NAME:key=value,key=value` (values read as YAML: numbers, lists, null)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise AuditError(f"--pruner {text!r}: expected NAME:key=value,..., got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    if not name.strip():
        raise AuditError(f"--pruner {text!r}: a pruner name is needed, e.g. median")
    return name.strip(), options


def build_pruner(text: str) -> optuna.pruners.BasePruner:
    name, options = parse_setting(text)
    try:
        return make_pruner(name, options)
    except (ValueError, TypeError) as e:
        raise AuditError(f"--pruner {text!r}: {e}") from None


def replayable(study: optuna.Study) -> list[FrozenTrial]:
    """The finished trials with a curve, in the order they started."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.intermediate_values
    ]
    return sorted(trials, key=lambda t: (t.datetime_start or t.datetime_complete, t.number))


def actual(study: optuna.Study) -> SettingResult:
    """What happened in the study."""
    result = SettingResult(ACTUAL)
    best = _best_number(study)
    for trial in replayable(study):
        steps = sorted(trial.intermediate_values)
        result.epochs += len(steps)
        result.seconds += trial_seconds(trial)
        if trial.state == TrialState.PRUNED:
            result.pruned[trial.number] = {
                "epoch": steps[-1],
                "rule": trial.user_attrs.get(record.PRUNE_RULE, "pruner"),
            }
    result.best_survives = None if best is None else best not in result.pruned
    return result


def replay(study: optuna.Study, setting: str) -> SettingResult:
    """Replay the recorded curves through the pruner `setting` on an in-memory study."""
    pruner = build_pruner(setting)
    memory = optuna.create_study(
        direction=study.direction, pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0)
    )
    result = SettingResult(setting)
    best = _best_number(study)
    for trial in replayable(study):
        rows = {int(r["epoch"]): r for r in record.epoch_rows(trial)}
        per_epoch = trial_seconds(trial) / max(1, len(trial.intermediate_values))
        memory.enqueue_trial(trial.params, skip_if_exists=False)
        live = memory.ask()
        history: list[dict[str, Any]] = []
        stopped = None
        for step in sorted(trial.intermediate_values):
            value = trial.intermediate_values[step]
            row = rows.get(step, {"epoch": step})
            history.append(row)
            live.set_user_attr(record.EPOCH_METRICS, history)
            live.report(value, step)
            result.epochs += 1
            result.seconds += float(row.get("epoch_seconds", per_epoch))
            if live.should_prune():
                stopped = step
                break
        if stopped is not None:
            result.pruned[trial.number] = {
                "epoch": stopped,
                "rule": live.user_attrs.get(record.PRUNE_RULE, type(pruner).__name__),
            }
            memory.tell(live, state=TrialState.PRUNED)
            continue
        if trial.state == TrialState.PRUNED:
            result.unobserved.append(trial.number)
            memory.tell(live, state=TrialState.PRUNED)
        else:
            memory.tell(live, _finite(trial.value))
    result.best_survives = None if best is None else best not in result.pruned
    return result


def audit(study: optuna.Study, settings: list[str]) -> list[SettingResult]:
    """What happened, then each setting replayed; settings are checked before any replay."""
    for setting in settings:
        build_pruner(setting)
    pruning_log = logging.getLogger("search.pruning")
    level = pruning_log.level
    pruning_log.setLevel(logging.WARNING)  # the replay's prunes are the result, not news
    try:
        return [actual(study), *(replay(study, s) for s in settings)]
    finally:
        pruning_log.setLevel(level)


def _best_number(study: optuna.Study) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:
        return None


def _finite(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("nan")


def render_audit(name: str, results: list[SettingResult]) -> RenderableType:
    """The settings side by side, then which trial each prunes at which epoch."""
    from rich.table import Table

    table = Table(title=f"Pruner audit of {name}")
    for header in ("setting", "pruned", "epochs", "GPU s", "best survives", "unobserved"):
        table.add_column(
            header, overflow="fold", justify="left" if header == "setting" else "right"
        )
    for r in results:
        survives = "—" if r.best_survives is None else ("yes" if r.best_survives else "NO")
        table.add_row(
            r.setting,
            str(len(r.pruned)),
            str(r.epochs),
            f"{r.seconds:.1f}",
            survives,
            str(len(r.unobserved)),
        )
    parts: list[RenderableType] = [table]
    numbers = sorted({n for r in results for n in r.pruned})
    if numbers:
        detail = Table(title="Pruned at epoch (rule)")
        detail.add_column("trial", justify="right")
        for r in results:
            detail.add_column(r.setting, overflow="fold")
        for n in numbers:
            detail.add_row(
                str(n),
                *(
                    f"{r.pruned[n]['epoch']} ({r.pruned[n]['rule']})" if n in r.pruned else "—"
                    for r in results
                ),
            )
        parts.append(detail)
    return Group(*parts)
