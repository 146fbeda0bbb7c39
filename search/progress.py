"""What `search launch` shows: the live progress bar and the best-trial summary.

Numbers are never cut: on a narrow terminal (or piped output, 80 columns) the counts wrap
onto the next line instead of being cropped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import optuna
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from search import record
from search.budget import BudgetState


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
        BarColumn(bar_width=None, table_column=Column(ratio=1)),  # what the numbers leave
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with _Progress(*columns, console=console, transient=False, expand=True) as bar:
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


class _Progress(Progress):
    """The bar and its numbers on one line, the counts on the next (wrapped, never cut)."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            yield Text(str(task.fields.get("stats", "")), overflow="fold")


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
    metric = study.user_attrs.get(record.SPEC, {}).get("metric", "value")
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
    rows = [
        r for r in trial.user_attrs.get(record.EPOCH_METRICS, []) if r.get(metric) == r.get(metric)
    ]
    if not rows:
        return None
    pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
    return dict(pick(rows, key=lambda r: r[metric]))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
