"""What people read: the live progress bar, the best-trial summary, `search status` data."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from search.budget import BUDGET_ATTR, BudgetState


@contextlib.contextmanager
def progress_display(
    study: optuna.Study, *, enabled: bool, console: Console, best_every: float = 2.0
) -> Iterator[Callable[[BudgetState], None]]:
    """A callback that draws the study's progress and best value; a no-op when disabled."""
    if not enabled:
        yield lambda state: None
        return
    columns = (
        TextColumn("[bold]trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("trials", total=None, stats="")
        best_value, best_at = ["—"], [0.0]

        def update(state: BudgetState) -> None:
            now = time.monotonic()
            if state.complete and now - best_at[0] >= best_every:  # one query, not every tick
                with contextlib.suppress(ValueError):
                    best_value[0] = f"{study.best_value:.4g}"
                best_at[0] = now
            stats = (
                f"complete {state.complete} · pruned {state.pruned} · failed "
                f"{state.failed} · running {state.running} · best {best_value[0]}"
            )
            bar.update(task, completed=state.finished, total=state.n_trials, stats=stats)

        yield update


def best_summary(study: optuna.Study, state: BudgetState) -> Group | str:
    """The final counts and the best trial's value, metrics and parameters."""
    counts = (
        f"{state.finished}/{state.n_trials} finished: {state.complete} complete, "
        f"{state.pruned} pruned, {state.failed} failed"
    )
    try:
        best = study.best_trial
    except ValueError:
        return f"{counts}. No trial completed yet."
    metric = study.user_attrs.get("spec", {}).get("metric", "value")
    table = Table(title=f"Best trial {best.number}: {metric} = {best.value:.5g}", show_header=True)
    table.add_column("parameter")
    table.add_column("value")
    for key, value in best.params.items():
        table.add_row(key, _fmt(value))
    epoch = best_epoch_metrics(best, metric, study.direction)
    for key, value in (epoch or {}).items():
        if key not in (metric, "epoch_seconds"):
            table.add_row(f"[dim]{key} (best epoch)[/]", _fmt(value))
    return Group(counts, table)


def best_epoch_metrics(
    trial: optuna.trial.FrozenTrial, metric: str, direction: optuna.study.StudyDirection
) -> dict[str, Any] | None:
    """The per-epoch metrics row where `metric` was best."""
    rows = [r for r in trial.user_attrs.get("epoch_metrics", []) if r.get(metric) == r.get(metric)]
    if not rows:
        return None
    pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
    return dict(pick(rows, key=lambda r: r[metric]))


def study_status(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any]:
    """Counts per state, budget, best value and parameters of one study, as plain data."""
    from search.exceptions import StudyNotFoundError

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as e:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StudyNotFoundError(
            f"no study {name!r} here; studies: {', '.join(names) or 'none'}"
        ) from e
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    row: dict[str, Any] = {
        "study": name,
        "direction": study.direction.name.lower(),
        "n_trials": study.user_attrs.get(BUDGET_ATTR),
        "counts": {s.name: counts.get(s.name, 0) for s in TrialState},
        "best_trial": None,
        "best_value": None,
        "best_params": {},
    }
    with contextlib.suppress(ValueError):
        best = study.best_trial
        row.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    return row


def status_rows(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """`study_status` for every study in the storage."""
    return [study_status(storage, s.study_name) for s in optuna.get_all_study_summaries(storage)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
