"""`search report`: one self-contained, offline HTML file that explains a study.

The file embeds plotly.js once and holds: the optimization history; every trial's curve
coloured by state and prune rule; parameter importances; parallel coordinates over learning
rate, batch size, depth and width; slice plots; the timeline of workers; the best trials with
their parameters and per-epoch metrics; and the compute summary (`compute_summary`). It is
built from a read-only storage: no write connection, no migration.
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import record

logger = logging.getLogger(__name__)

#: Parameters of the parallel-coordinates plot, when the study has them.
PARALLEL_PARAMS = ("lr", "batch_size", "depth", "width")
_STATE_COLOURS = {"COMPLETE": "#2ca02c", "FAIL": "#d62728", "RUNNING": "#7f7f7f"}
_RULE_COLOURS = ("#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#1f77b4")


def trial_seconds(trial: FrozenTrial) -> float:
    """GPU-time a trial spent: the sum of its epochs' `epoch_seconds`, else its duration."""
    seconds = [float(r["epoch_seconds"]) for r in record.epoch_rows(trial) if "epoch_seconds" in r]
    if seconds:
        return sum(seconds)
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return 0.0


def epochs_run(trial: FrozenTrial) -> int:
    steps = [int(r["epoch"]) for r in record.epoch_rows(trial)] + list(trial.intermediate_values)
    return max(steps, default=0)


def stopped_by(trial: FrozenTrial) -> str | None:
    """What stopped a trial before its last epoch: the prune rule of a PRUNED trial, the rule
    (or early stopping) of one ended at its best, tagged so; None for any other trial."""
    if trial.state == TrialState.PRUNED:
        return str(trial.user_attrs.get(record.PRUNE_RULE, "pruner"))
    if trial.state == TrialState.COMPLETE and record.outcome_of(trial) == record.Outcome.ENDED:
        return f"{record.stop_rule(trial)} (ended at its best)"
    return None


def compute_summary(study: optuna.Study) -> dict[str, Any]:
    """Where the compute went: seconds per state, what stopping early saved per rule, what
    failures and retries cost.

    Savings are measured against running every trial stopped early to the study's last epoch
    at its own mean epoch time: the PRUNED ones (by `prune_rule`) and the COMPLETE ones ended
    at their best (`stopped_by`: their rule, or early stopping, "(ended at its best)").
    """
    trials = study.get_trials(deepcopy=False)
    max_epochs = int((study.user_attrs.get(record.SPEC) or {}).get("epochs") or 0)
    per_state: dict[str, dict[str, float]] = defaultdict(lambda: {"trials": 0, "seconds": 0.0})
    saved: dict[str, dict[str, float]] = defaultdict(
        lambda: {"trials": 0, "epochs_run": 0, "epochs_saved": 0, "seconds_saved": 0.0}
    )
    failures: dict[str, dict[str, float]] = defaultdict(lambda: {"trials": 0, "seconds": 0.0})
    for trial in trials:
        seconds, run = trial_seconds(trial), epochs_run(trial)
        per_state[trial.state.name]["trials"] += 1
        per_state[trial.state.name]["seconds"] += seconds
        rule = stopped_by(trial)
        if rule is not None:
            left = max(0, max_epochs - run)
            row = saved[rule]
            row["trials"] += 1
            row["epochs_run"] += run
            row["epochs_saved"] += left
            row["seconds_saved"] += left * (seconds / run if run else 0.0)
        elif trial.state == TrialState.FAIL:
            outcome = record.outcome_of(trial)
            failures[outcome.value if outcome else "error"]["trials"] += 1
            failures[outcome.value if outcome else "error"]["seconds"] += seconds
    total = sum(s["seconds"] for s in per_state.values())
    return {
        "max_epochs": max_epochs,
        "total_seconds": total,
        "per_state": dict(per_state),
        "pruning_saved": dict(saved),
        "failures": dict(failures),
        "retries": sum(1 for t in trials if record.RETRY_OF in t.user_attrs),
        "seconds_lost_to_failures": sum(f["seconds"] for f in failures.values()),
    }


def build_report(study: optuna.Study) -> str:
    """The whole report as one HTML document (plotly.js embedded once, nothing fetched)."""
    figures = _figures(study)
    parts = []
    for index, (title, figure) in enumerate(figures):
        div = figure.to_html(
            full_html=False,
            include_plotlyjs=index == 0,
            div_id=f"plot-{index}",
            config={"displaylogo": False, "responsive": True},
        )
        parts.append(f"<section><h2>{html.escape(title)}</h2>{div}</section>")
    name = html.escape(study.study_name)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>search report: {name}</title><style>{_CSS}</style></head><body>"
        f"<h1>Study {name}</h1>{_overview(study)}{_compute_html(compute_summary(study))}"
        f"{''.join(parts)}{_best_trials_html(study)}</body></html>"
    )


def _figures(study: optuna.Study) -> list[tuple[str, Any]]:
    import optuna.visualization as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = {p for t in complete for p in t.params}
    figures: list[tuple[str, Any]] = [
        ("Optimization history", vis.plot_optimization_history(study)),
        ("Learning curves by state and prune rule", curves_figure(study)),
    ]
    if len(complete) >= 2 and names:
        try:
            figures.append(("Parameter importances", vis.plot_param_importances(study)))
        except (ValueError, RuntimeError) as e:  # e.g. every parameter constant
            logger.warning("Parameter importances skipped: %s", e)
    parallel = [p for p in PARALLEL_PARAMS if p in names] or sorted(names)
    if complete and parallel:
        figures.append(
            ("Parallel coordinates", vis.plot_parallel_coordinate(study, params=parallel))
        )
    if complete and names:
        figures.append(("Slice plots", vis.plot_slice(study)))
    figures.append(("Timeline of workers", workers_figure(study)))
    return figures


def curves_figure(study: optuna.Study) -> Any:
    """Every trial's intermediate values, one colour per state (pruned: per prune rule)."""
    import plotly.graph_objects as go

    figure = go.Figure()
    colours: dict[str, str] = {}
    shown: set[str] = set()
    for trial in study.get_trials(deepcopy=False):
        if not trial.intermediate_values:
            continue
        group = trial.state.name
        if trial.state == TrialState.PRUNED:
            group = f"PRUNED: {trial.user_attrs.get(record.PRUNE_RULE, 'pruner')}"
        if group not in colours:
            colours[group] = _STATE_COLOURS.get(
                group, _RULE_COLOURS[len(colours) % len(_RULE_COLOURS)]
            )
        steps = sorted(trial.intermediate_values)
        figure.add_trace(
            go.Scatter(
                x=steps,
                y=[trial.intermediate_values[s] for s in steps],
                mode="lines+markers",
                name=group,
                legendgroup=group,
                showlegend=group not in shown,
                line={"color": colours[group]},
                hovertext=f"trial {trial.number}: "
                + str(trial.user_attrs.get(record.PRUNE_REASON, trial.state.name)),
            )
        )
        shown.add(group)
    metric = (study.user_attrs.get(record.SPEC) or {}).get("metric", "value")
    figure.update_layout(xaxis_title="epoch", yaxis_title=metric, legend_title="state / rule")
    return figure


def workers_figure(study: optuna.Study) -> Any:
    """One row per worker, one bar per trial from its start to its end, coloured by state."""
    import plotly.graph_objects as go

    figure = go.Figure()
    shown: set[str] = set()
    for trial in study.get_trials(deepcopy=False):
        if trial.datetime_start is None:
            continue
        end = trial.datetime_complete or trial.datetime_start
        worker = str(trial.user_attrs.get(record.WORKER, "unknown"))
        state = trial.state.name
        figure.add_trace(
            go.Scatter(
                x=[trial.datetime_start, end],
                y=[worker, worker],
                mode="lines",
                line={"width": 12, "color": _STATE_COLOURS.get(state, "#ff7f0e")},
                name=state,
                legendgroup=state,
                showlegend=state not in shown,
                hovertext=f"trial {trial.number} ({state})",
            )
        )
        shown.add(state)
    figure.update_layout(xaxis_title="time", yaxis_title="worker")
    return figure


def _overview(study: optuna.Study) -> str:
    spec = study.user_attrs.get(record.SPEC) or {}
    rows = {
        "direction": study.direction.name.lower(),
        "metric": spec.get("metric", "value"),
        "budget": study.user_attrs.get(record.BUDGET, "—"),
        "trials": len(study.get_trials(deepcopy=False)),
    }
    try:
        rows["best"] = f"trial {study.best_trial.number}: {study.best_value:.6g}"
    except ValueError:
        rows["best"] = "no trial completed"
    return _table(["field", "value"], [[k, v] for k, v in rows.items()])


def _compute_html(summary: dict[str, Any]) -> str:
    states = [
        [state, int(s["trials"]), f"{s['seconds']:.1f}"]
        for state, s in sorted(summary["per_state"].items())
    ]
    saved = [
        [
            rule,
            int(s["trials"]),
            int(s["epochs_run"]),
            int(s["epochs_saved"]),
            f"{s['seconds_saved']:.1f}",
        ]
        for rule, s in sorted(summary["pruning_saved"].items())
    ]
    failures = [
        [reason, int(s["trials"]), f"{s['seconds']:.1f}"]
        for reason, s in sorted(summary["failures"].items())
    ]
    return (
        "<section id='compute'><h2>Compute summary</h2>"
        f"<p>GPU-time (epoch seconds) in all: {summary['total_seconds']:.1f} s; "
        f"retried trials: {summary['retries']}; time lost to failures: "
        f"{summary['seconds_lost_to_failures']:.1f} s.</p>"
        + _table(["state", "trials", "seconds"], states)
        + f"<h3>Saved by pruning and early stopping (vs. running each pruned or ended trial "
        f"to epoch {summary['max_epochs']})</h3>"
        + _table(["rule", "trials", "epochs run", "epochs saved", "seconds saved"], saved)
        + "<h3>Lost to failures and retries</h3>"
        + _table(["outcome", "trials", "seconds"], failures)
        + "</section>"
    )


def _best_trials_html(study: optuna.Study, count: int = 5) -> str:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    best = sorted(complete, key=lambda t: sign * float(t.value or 0.0))[:count]
    blocks = []
    for trial in best:
        rows = record.epoch_rows(trial)
        keys = sorted({k for r in rows for k in r} - {"epoch"})
        cells = [[r["epoch"], *(r.get(k, "") for k in keys)] for r in rows]
        epochs = _table(["epoch", *keys], cells)
        params = json.dumps(trial.params, default=str)
        blocks.append(
            f"<h3>Trial {trial.number}: {trial.value:.6g}</h3><p>{html.escape(params)}</p>{epochs}"
        )
    return (
        "<section id='best-trials'><h2>Best trials</h2>"
        + ("".join(blocks) or "<p>No trial completed.</p>")
        + "</section>"
    )


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return html.escape(f"{value:.6g}" if isinstance(value, float) else str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
    "section{margin-bottom:2em}"
)
