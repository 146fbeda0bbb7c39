"""`search audit`: replay a finished study's recorded curves through other pruner settings.

Each setting (`median`, `default:divergence_margin=0.5`, ... built by `make_pruner`) gets a
fresh in-memory study. The recorded trials are replayed in the order they were run, epoch by
epoch (the intermediate values and the `epoch_metrics` rows), through the Optuna contract
`trial.report` / `trial.should_prune()` (`decide` for this package's pruners, which also tell
an end from a prune); a trial the setting prunes stops there, one it ends at its best ("end,
don't lose") stops there and completes with its best value so far. The audit tells, per
setting: which trials it prunes and which it ends, at which epoch, whether the study's best
trial survives, and the epochs and GPU-time (recorded `epoch_seconds`) it spends.

Each replayed trial is given to the setting's peers as it is told, so every trial is compared
with all before it, as a study's lone worker compares (`PeerFeed.add_own`): the study's own
setting replays a one-worker study's decisions exactly.

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

from search import optuna_compat, record
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
    ended: dict[int, dict[str, Any]] = field(default_factory=dict)  # ended at its best
    epochs: int = 0
    seconds: float = 0.0
    unobserved: list[int] = field(default_factory=list)
    best_survives: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pruned"] = {str(k): v for k, v in self.pruned.items()}
        data["ended"] = {str(k): v for k, v in self.ended.items()}
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
        elif record.outcome_of(trial) == record.Outcome.ENDED:
            result.ended[trial.number] = {"epoch": steps[-1], "rule": record.stop_rule(trial)}
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
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    for trial in replayable(study):
        rows = {int(r["epoch"]): r for r in record.epoch_rows(trial)}
        per_epoch = trial_seconds(trial) / max(1, len(trial.intermediate_values))
        memory.enqueue_trial(trial.params, skip_if_exists=False)
        live = memory.ask()
        history: list[dict[str, Any]] = []
        stopped: int | None = None
        end, lowest = False, math.inf
        for step in sorted(trial.intermediate_values):
            value = trial.intermediate_values[step]
            row = rows.get(step, {"epoch": step})
            history.append(row)
            live.set_user_attr(record.EPOCH_METRICS, history)
            live.report(value, step)
            result.epochs += 1
            result.seconds += float(row.get("epoch_seconds", per_epoch))
            if math.isfinite(value):
                lowest = min(lowest, sign * value)
            stops, end = _stop(memory, live, pruner)
            if stops:
                stopped = step
                break
        if stopped is not None:
            rule = live.user_attrs.get(record.PRUNE_RULE, type(pruner).__name__)
            if end and math.isfinite(lowest):
                result.ended[trial.number] = {"epoch": stopped, "rule": rule}
                _count(pruner, memory, memory.tell(live, sign * lowest))
                continue
            result.pruned[trial.number] = {"epoch": stopped, "rule": rule}
            _count(pruner, memory, memory.tell(live, state=TrialState.PRUNED))
            continue
        if trial.state == TrialState.PRUNED:
            result.unobserved.append(trial.number)
            _count(pruner, memory, memory.tell(live, state=TrialState.PRUNED))
        else:
            _count(pruner, memory, memory.tell(live, _finite(trial.value)))
    result.best_survives = None if best is None else best not in result.pruned
    return result


def _count(pruner: optuna.pruners.BasePruner, memory: optuna.Study, told: FrozenTrial) -> None:
    """Give a replayed trial to the pruner's peers as soon as it is told, as a worker counts
    its own finished trials (`PeerFeed.add_own`): the replay then compares each trial with
    every one before it, as the study's single worker did, not with a view up to
    `refresh_every` decisions old."""
    cache = getattr(pruner, "cache", None)  # this package's pruners; Optuna's have none
    peers = cache.cached(memory) if cache is not None else None
    if peers is not None:
        peers.add([told])


def _stop(
    memory: optuna.Study, live: optuna.Trial, pruner: optuna.pruners.BasePruner
) -> tuple[bool, bool]:
    """Ask the pruner as `should_prune` does: (whether it stops the trial, whether that is an
    end). This package's pruners answer with their `Verdict` (`stop`: what `prune` does, the
    verdict kept); any other pruner through `should_prune`."""
    stop = getattr(pruner, "stop", None)
    if stop is None:
        return live.should_prune(), False
    frozen = optuna_compat.latest_trial(live)
    verdict = stop(memory, frozen)  # `record` updates `live`'s cached attrs too
    return verdict is not None, verdict is not None and verdict.end


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


def _stop_cell(result: SettingResult, number: int) -> str:
    if number in result.pruned:
        return f"{result.pruned[number]['epoch']} ({result.pruned[number]['rule']})"
    if number in result.ended:
        return f"{result.ended[number]['epoch']} ({result.ended[number]['rule']}, ended)"
    return "—"


def render_audit(name: str, results: list[SettingResult]) -> RenderableType:
    """The settings side by side, then which trial each prunes at which epoch."""
    from rich.table import Table

    table = Table(title=f"Pruner audit of {name}")
    columns = ("setting", "pruned", "ended", "epochs", "GPU s", "best survives", "unobserved")
    for header in columns:
        table.add_column(
            header, overflow="fold", justify="left" if header == "setting" else "right"
        )
    for r in results:
        survives = "—" if r.best_survives is None else ("yes" if r.best_survives else "NO")
        table.add_row(
            r.setting,
            str(len(r.pruned)),
            str(len(r.ended)),
            str(r.epochs),
            f"{r.seconds:.1f}",
            survives,
            str(len(r.unobserved)),
        )
    parts: list[RenderableType] = [table]
    numbers = sorted({n for r in results for n in (*r.pruned, *r.ended)})
    if numbers:
        detail = Table(title="Pruned (or ended at its best) at epoch (rule)")
        detail.add_column("trial", justify="right")
        for r in results:
            detail.add_column(r.setting, overflow="fold")
        for n in numbers:
            detail.add_row(
                str(n),
                *(_stop_cell(r, n) for r in results),
            )
        parts.append(detail)
    return Group(*parts)
