"""Milliseconds per `should_prune` call in a PostgreSQL study of 5,000 finished trials.

Fills a study with finished trials built from the recorded digits curves (40 intermediate
values and the `epoch_metrics` attribute each; 60% complete, 40% pruned), adds a few RUNNING
trials as other workers would, then for each pruner does what one worker process does: opens
the storage (`search.storage.open_storage`), loads the study with that pruner, and runs
`--repeats` trials one after the other, timing `trial.should_prune()` after each of 40 epochs
reported like `search.reporter.Reporter` does. The trials replay the best curve so that no
pruner stops them early. `max` is the slowest call: for `default_pruner()`, its first
comparison in the process, which reads every finished trial once.

    psql -h 127.0.0.1 -U postgres -c 'create database bench'   # once
    python benchmarks/pruning/cost.py --storage postgresql://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from rich import box
from rich.console import Console
from rich.table import Table

from search.pruning import DivergencePruner, default_pruner
from search.storage import open_storage

HERE = Path(__file__).resolve().parent
EPOCHS = 40


def rows(curve: np.ndarray, upto: int) -> list[dict[str, float]]:
    return [
        {
            "epoch": e + 1,
            "val_loss": float(curve[0, e]),
            "val_accuracy": float(curve[3, e]),
            "train_loss": float(curve[1, e]),
            "lr": 0.01,
            "grad_norm": float(curve[2, e]),
            "epoch_seconds": 0.05,
        }
        for e in range(upto)
    ]


def populate(study: optuna.Study, curves: np.ndarray, total: int) -> None:
    rng = np.random.default_rng(0)
    have = len(study.get_trials(deepcopy=False))
    batch: list[optuna.trial.FrozenTrial] = []
    for n in range(have, total):
        curve = np.nan_to_num(curves[n % len(curves)], nan=1e3, posinf=1e3)
        pruned = rng.random() < 0.4
        steps = int(rng.integers(1, EPOCHS)) if pruned else EPOCHS
        batch.append(
            create_trial(
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                value=None if pruned else float(curve[0, :steps].min()),
                params={"lr": float(10 ** rng.uniform(-5, 0))},
                distributions={"lr": FloatDistribution(1e-5, 1.0, log=True)},
                intermediate_values={e + 1: float(curve[0, e]) for e in range(steps)},
                user_attrs={"epoch_metrics": rows(curve, steps)},
            )
        )
        if len(batch) == 250 or n == total - 1:
            study.add_trials(batch)
            batch = []
            print(f"{n + 1}/{total} trials", flush=True)


def measure(
    url: str, name: str, pruner: optuna.pruners.BasePruner, curve: np.ndarray, repeats: int
) -> list[float]:
    """Milliseconds of each `should_prune` call of `repeats` trials in one worker process."""
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    times = []
    for _ in range(repeats):
        trial = study.ask({"lr": FloatDistribution(1e-5, 1.0, log=True)})
        history: list[dict[str, float]] = []
        for epoch, row in enumerate(rows(curve, EPOCHS), start=1):
            trial.report(row["val_loss"], epoch)
            history.append(row)
            trial.set_user_attr("epoch_metrics", history)
            began = time.perf_counter()
            pruned = trial.should_prune()
            times.append((time.perf_counter() - began) * 1000)
            if pruned:
                break
        study.tell(trial, state=TrialState.FAIL)
    storage.engine.dispose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="postgresql://postgres@127.0.0.1:5432/bench")
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--running", type=int, default=4, help="RUNNING trials of other workers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    data = np.load(HERE / "curves" / "digits.npz")
    curves = data["curves"]
    name = f"pruning-cost-{args.trials}"
    study = optuna.create_study(
        study_name=name, storage=open_storage(args.storage), load_if_exists=True
    )
    populate(study, curves, args.trials)
    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for _ in range(args.running - len(running)):
        other = study.ask({"lr": FloatDistribution(1e-5, 1.0, log=True)})
        for row in rows(curves[0], 10):
            other.report(row["val_loss"], int(row["epoch"]))
        other.set_user_attr("epoch_metrics", rows(curves[0], 10))
    finite = np.where(np.isfinite(curves[:, 0]), curves[:, 0], np.inf).min(axis=1)
    best = curves[int(np.argmin(finite))]
    pruners = {
        "MedianPruner(5, 5)": lambda: optuna.pruners.MedianPruner(5, 5),
        "default_pruner()": default_pruner,
        "own-curve rules only": lambda: DivergencePruner(None),
    }
    console = Console(width=160)
    out = Table(
        title=f"should_prune, {args.trials} finished + {args.running} running trials, PostgreSQL",
        box=box.MARKDOWN,
    )
    for column in ("pruner", "ms/call mean", "p50", "p95", "max", "calls"):
        out.add_column(column, justify="left" if column == "pruner" else "right")
    figures = {}
    for label, factory in pruners.items():
        times = measure(args.storage, name, factory(), best, args.repeats)
        ordered = sorted(times)
        figures[label] = {"mean": statistics.fmean(times), "max": ordered[-1]}
        out.add_row(
            label,
            f"{statistics.fmean(times):.2f}",
            f"{ordered[len(times) // 2]:.2f}",
            f"{ordered[int(len(times) * 0.95)]:.2f}",
            f"{ordered[-1]:.1f}",
            str(len(times)),
        )
    console.print(out)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
