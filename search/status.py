"""`search status`: how each study stands, as plain data and as a table that never cuts a number.

The data (`study_status`, `status_rows`) is read through a read-only storage: counts per state,
budget, best trial, trials per hour, the running trials with host, device, epoch and the age of
their last heartbeat, stale trials (no heartbeat within the study's grace period) and retries.
`render_status` draws it; when the table would be wider than the terminal (or the 80 columns
of piped output) each study is shown as a list of `field: value` lines instead, so numbers are
never cropped.
"""

from __future__ import annotations

import contextlib
import datetime
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from search import optuna_compat, record
from search.exceptions import StudyNotFoundError

#: The grace period of a study whose spec does not say (the spec default).
DEFAULT_GRACE_PERIOD = 20
_COUNT_COLUMNS = ("budget", "complete", "pruned", "failed", "run", "wait", "stale")


def study_status(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any]:
    """Counts per state, budget, best trial, throughput, running and stale trials, retries.

    Raises:
        StudyNotFoundError: no study of that name in the storage.
    """
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as e:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StudyNotFoundError(
            f"no study {name!r} here; studies: {', '.join(names) or 'none'}"
        ) from e
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    spec = study.user_attrs.get(record.SPEC) or {}
    grace = int((spec.get("workers") or {}).get("grace_period") or DEFAULT_GRACE_PERIOD)
    running = _running(storage, [t for t in trials if t.state == TrialState.RUNNING], grace)
    row: dict[str, Any] = {
        "study": name,
        "direction": study.direction.name.lower(),
        "metric": spec.get("metric"),
        "n_trials": study.user_attrs.get(record.BUDGET),
        "counts": {s.name: counts.get(s.name, 0) for s in TrialState},
        "best_trial": None,
        "best_value": None,
        "best_params": {},
        "trials_per_hour": trials_per_hour(trials),
        "running": running,
        "stale": [r["number"] for r in running if r["stale"]],
        "grace_period": grace,
        "retries": sum(1 for t in trials if record.RETRY_OF in t.user_attrs),
    }
    with contextlib.suppress(ValueError):
        best = study.best_trial
        row.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    return row


def open_study_read_only(name: str, url: str) -> optuna.Study:
    """Load study `name` through a read-only storage (nothing created, nothing migrated).

    Raises:
        StorageError: see `open_storage_read_only`.
        StudyNotFoundError: no study of that name there.
    """
    from search.storage import open_storage_read_only

    storage = open_storage_read_only(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StudyNotFoundError(
            f"no study {name!r} here; studies: {', '.join(names) or 'none'}"
        ) from None


def status_rows(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """`study_status` for every study in the storage."""
    return [study_status(storage, s.study_name) for s in optuna.get_all_study_summaries(storage)]


def trials_per_hour(trials: list[FrozenTrial]) -> float | None:
    """Finished (COMPLETE + PRUNED) trials per hour between the first start and last finish."""
    ends = [
        t.datetime_complete
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete
    ]
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if not ends or not starts:
        return None
    hours = (max(ends) - min(starts)).total_seconds() / 3600
    return round(len(ends) / hours, 1) if hours > 0 else None


def _running(
    storage: optuna.storages.BaseStorage, trials: list[FrozenTrial], grace: int
) -> list[dict[str, Any]]:
    if not trials:
        return []
    ids = {t.number: optuna_compat.trial_id(t) for t in trials}
    beats = optuna_compat.heartbeats(storage, list(ids.values()))
    now = optuna_compat.database_now(storage)
    rows = []
    for trial in trials:
        beat = beats.get(ids[trial.number])
        age = _seconds(now, beat) if beat is not None else None
        started = _seconds(datetime.datetime.now(), trial.datetime_start)
        rows.append(
            {
                "number": trial.number,
                "host": trial.user_attrs.get(record.HOST),
                "device": trial.user_attrs.get(record.DEVICE),
                "worker": trial.user_attrs.get(record.WORKER),
                "epoch": max(trial.intermediate_values, default=None),
                "heartbeat_age_s": age,
                "stale": (age if age is not None else started or 0.0) > grace,
                "params": trial.params,
            }
        )
    return rows


def _seconds(now: datetime.datetime, then: datetime.datetime | None) -> float | None:
    if then is None:
        return None
    if (now.tzinfo is None) != (then.tzinfo is None):
        now, then = now.replace(tzinfo=None), then.replace(tzinfo=None)
    return round((now - then).total_seconds(), 1)


def render_status(rows: list[dict[str, Any]], *, width: int, one_study: bool) -> RenderableType:
    """The status table, or per-study `field: value` lines when the table would not fit."""
    cells = [_cells(r) for r in rows]
    headers = ("study", *_COUNT_COLUMNS, "per h", "best")
    table = Table(
        title=None if one_study else "Studies",
        box=box.SIMPLE_HEAD,
        padding=(0, 0),
        show_edge=False,
        title_justify="left",
    )
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    for c in cells:
        table.add_row(*c)
    parts: list[RenderableType] = []
    if Console(width=10_000).measure(table).maximum <= width:
        parts.append(table)
    else:  # one `field: value` line each: long names wrap, numbers stay whole
        for c in cells:
            parts.append(Text(f"study {c[0]}", style="bold", overflow="fold"))
            fields = zip(headers[1:], c[1:], strict=True)
            parts.extend(Text(f"  {h}: {v}", overflow="fold") for h, v in fields)
    for row in rows:
        parts.extend(_details(row, one_study=one_study))
    return Group(*parts)


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    c = row["counts"]
    return (
        row["study"],
        str(row["n_trials"] or "—"),
        str(c["COMPLETE"]),
        str(c["PRUNED"]),
        str(c["FAIL"]),
        str(c["RUNNING"]),
        str(c["WAITING"]),
        str(len(row["stale"])),
        "—" if row["trials_per_hour"] is None else f"{row['trials_per_hour']:g}",
        "—" if row["best_value"] is None else _number(row["best_value"]),
    )


def _details(row: dict[str, Any], *, one_study: bool) -> list[Text]:
    lines: list[Text] = []
    prefix = "" if one_study else f"{row['study']}: "
    for r in row["running"]:
        age = "never" if r["heartbeat_age_s"] is None else f"{r['heartbeat_age_s']:g} s ago"
        lines.append(
            Text(
                f"{prefix}running trial {r['number']} on {r['host'] or '?'} {r['device'] or '?'}"
                f", epoch {r['epoch'] if r['epoch'] is not None else '—'}, heartbeat {age}"
                + (f" (stale: > {row['grace_period']} s)" if r["stale"] else ""),
                overflow="fold",
            )
        )
    if row["retries"]:
        lines.append(Text(f"{prefix}{row['retries']} retried trial(s)", overflow="fold"))
    if one_study and row["best_params"]:
        params = ", ".join(f"{k}={_number(v)}" for k, v in row["best_params"].items())
        lines.append(Text(f"best trial {row['best_trial']}: {params}", overflow="fold"))
    return lines


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def print_status(rows: list[dict[str, Any]], console: Console, *, one_study: bool) -> None:
    console.print(render_status(rows, width=console.width, one_study=one_study))
