"""Sampler feedback: what TPE proposes after diverged trials, by how they are reported.

Runs TPE studies that really train the built-in MLP (`search.trainable.train`, wine, 15 epochs)
through `search.reporter.Reporter` with `default_pruner()`, over several seeds, reporting the
trials that the divergence rules stop (prune rule divergence, explosion or non-finite) in
three ways, the pruning decisions and compute being the same:

    failed: the objective returns NaN (what a plain Optuna objective does with a NaN loss);
        TPE ignores FAIL trials.
    pruned: a PRUNED trial without constraint (`mark_infeasible=False`).
    pruned + constraint: as shipped, PRUNED with `constraints:diverged = 1.0`.

and counts the diverged trials in each half of each study.

    python benchmarks/pruning/feedback.py --seeds 10 --trials 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from pathlib import Path

import optuna
import torch
from rich import box
from rich.console import Console
from rich.table import Table

from search.exceptions import EarlyStopped
from search.pruning import DivergencePruner, TrendPruner
from search.reporter import Reporter
from search.spec import spec_from_dict
from search.trainable import train

DIVERGED = ("divergence", "explosion", "non-finite")
MODES = {
    "failed": "failed (NaN -> FAIL)",
    "pruned": "pruned, no constraint",
    "constraint": "pruned + constraint (shipped)",
}
SPEC = spec_from_dict(
    {
        "name": "feedback",
        "epochs": 15,
        "space": {
            "lr": {"low": 1e-5, "high": 10.0, "log": True},
            "batch_size": {"choices": [8, 16, 32, 64]},
            "depth": {"low": 1, "high": 4},
            "width": {"low": 8, "high": 256, "log": True},
            "optimizer": {"choices": ["adam", "sgd"]},
        },
        "objective": {"dataset": "wine"},
    }
)


def objective(trial: optuna.Trial, mode: str) -> float:
    params = {
        "lr": trial.suggest_float("lr", 1e-5, 10.0, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [8, 16, 32, 64]),
        "depth": trial.suggest_int("depth", 1, 4),
        "width": trial.suggest_int("width", 8, 256, log=True),
        "optimizer": trial.suggest_categorical("optimizer", ["adam", "sgd"]),
    }
    reporter = Reporter(trial, SPEC)
    try:
        with contextlib.suppress(EarlyStopped):
            train(params, "cpu", reporter, dataset="wine", epochs=SPEC.epochs, seed=trial.number)
    except optuna.TrialPruned:
        if mode == "failed" and trial.user_attrs.get("prune_rule") in DIVERGED:
            return float("nan")
        raise
    return reporter.best if reporter.best is not None else float("nan")


def run(seed: int, trials: int, mode: str) -> list[bool]:
    """Whether each trial of one study was stopped as diverged."""
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True),
        pruner=DivergencePruner(TrendPruner(), mark_infeasible=mode == "constraint"),
    )
    study.optimize(lambda t: objective(t, mode), n_trials=trials)
    return [t.user_attrs.get("prune_rule") in DIVERGED for t in study.trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    half = args.trials // 2
    out = Table(
        title=f"Diverged trials per study (TPE, {args.trials} trials, {args.seeds} seeds, wine)",
        box=box.MARKDOWN,
    )
    for column in ("diverged trials reported as", "first half", "second half", "per seed"):
        out.add_column(column, justify="left" if column.startswith("diverged") else "right")
    figures = {}
    began = time.perf_counter()
    for mode, label in MODES.items():
        flags = [run(seed, args.trials, mode) for seed in range(args.seeds)]
        first = [sum(f[:half]) for f in flags]
        second = [sum(f[half:]) for f in flags]
        figures[mode] = {"first": first, "second": second}
        out.add_row(
            label,
            f"{statistics.fmean(first):.2f}",
            f"{statistics.fmean(second):.2f}",
            " ".join(map(str, second)),
        )
    Console(width=160).print(out)
    print(f"{time.perf_counter() - began:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
