"""Time to quality, end to end: this service's default sampler + pruner against plain Optuna.

Real training with the built-in trainer (`search.trainable.train`) on digits, breast_cancer
and synthetic4 (a 4-class make_classification task with 5% label noise, the harder one: it
overfits late), the same search space, the same trial budget, early stopping OFF, both run
in-process on in-memory Optuna studies (so the figures measure the pruner and the sampler,
not the storage or the worker's bookkeeping):

    service: `search.study.make_sampler` (TPE, 8 startup trials, multivariate, constant
        liar; with `--start defaults` its first trial is `sampler.start: defaults`,
        `search.space.start_params`, queued as `create_or_update_study` queues it), and
        `default_pruner()`, asked per epoch as the worker asks it:
        `judge(Curve.from_rows(rows, ...), peers)` with one `Peers` fed each finished
        trial; an `end` verdict records the trial COMPLETE at its best value, a prune
        PRUNED; a trial that runs out completes with its best value (the worker's value).
    optuna: `TPESampler(seed)` and `MedianPruner()`, `trial.report` + `should_prune`, and
        the objective returns its last val_loss (what a plain Optuna objective does).

Both minimize val_loss. Quality is the val_accuracy of the study's best trial so far (at
its recorded epoch). Per task and seed the target is the better of the two final
accuracies minus 0.005 (0.5% accuracy); "to quality" is the compute spent (epochs, CPU
seconds of the training process, wall-clock) until the best trial reaches the target
(the whole study when it never does). Ratios are service / optuna, the geometric mean over
seeds; the paired test is Wilcoxon's signed-rank on the per-seed differences. "reached":
the seeds on which each side's best trial reached the target within the budget (a side that
never does is charged its whole study, which is less than the target would have cost it).

    python benchmarks/time_to_quality.py --seeds 5 --trials 20 --epochs 15
    python benchmarks/time_to_quality.py --summarize benchmarks/time_to_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.study import StudyDirection
from optuna.trial import TrialState
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent / "pruning"))
from make_curves import load

from search import space, trainable
from search.curves import Curve
from search.pruning import default_pruner
from search.spec import spec_from_dict
from search.study import make_sampler
from search.trend import Peers

TASKS = ("digits", "breast_cancer", "synthetic4")
TOLERANCE = 0.005
MIN = StudyDirection.MINIMIZE


class _Stop(Exception):
    def __init__(self, end: bool) -> None:
        self.end = end


#: The search space of both sides (in this order, which sets what a seeded sampler draws).
SPEC = spec_from_dict(
    {
        "name": "time-to-quality",
        "space": {
            "optimizer": {"choices": ["adam", "sgd"]},
            "lr": {"low": 1e-4, "high": 3.0, "log": True},
            "batch_size": {"choices": [16, 32, 64, 128]},
            "depth": {"low": 1, "high": 3},
            "width": {"low": 16, "high": 256, "log": True},
            "warmup_epochs": {"low": 0, "high": 3},
            "schedule": {"choices": ["constant", "cosine"]},
        },
    },
    source="time_to_quality.SPEC",
)


def run_study(
    task: str,
    seed: int,
    *,
    service: bool,
    trials: int,
    epochs: int,
    start: str = "none",
    sampler: str = "tpe",
) -> list[dict]:
    """One study; per finished trial: epochs, cpu and wall seconds, value and accuracy."""
    if service:
        chosen: optuna.samplers.BaseSampler = make_sampler(SPEC, seed=seed)
        if sampler == "gp":  # tried in session 6 (RESULTS-time-to-quality.md), not a spec type
            startup = SPEC.sampler.n_startup_trials
            chosen = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        study = optuna.create_study(sampler=chosen, pruner=optuna.pruners.NopPruner())
        spec = SPEC.model_copy(
            update={"sampler": SPEC.sampler.model_copy(update={"start": start})}
        )
        if first := space.start_params(spec):  # as create_or_update_study queues it
            study.enqueue_trial(first)
    else:
        study = optuna.create_study(
            sampler=optuna.samplers.TPESampler(seed=seed), pruner=optuna.pruners.MedianPruner()
        )
    pruner, peers = default_pruner(), Peers(MIN)
    log = []
    for _ in range(trials):
        trial = study.ask()
        params = space.suggest(trial, SPEC)
        rows: list[dict[str, float]] = []
        began_cpu, began = time.process_time(), time.perf_counter()

        def report(
            step: int,
            metrics: dict[str, float],
            trial: optuna.Trial = trial,
            rows: list[dict[str, float]] = rows,
            params: dict[str, Any] = params,
        ) -> None:
            rows.append({"epoch": step, **{k: float(v) for k, v in metrics.items()}})
            trial.report(float(metrics["val_loss"]), step)
            if service:
                curve = Curve.from_rows(rows, metric="val_loss", direction=MIN, params=params)
                verdict = pruner.judge(curve, peers)
                if verdict is not None:
                    raise _Stop(verdict.end)
            elif trial.should_prune():
                raise _Stop(False)

        state, end = TrialState.COMPLETE, False
        try:
            trainable.train(params, "cpu", report, dataset=task, epochs=epochs, seed=seed)
        except _Stop as stop:
            end = stop.end
            state = TrialState.COMPLETE if stop.end else TrialState.PRUNED
        finite = [r for r in rows if math.isfinite(r["val_loss"])]
        if service and state == TrialState.COMPLETE:
            chosen = min(finite, key=lambda r: r["val_loss"]) if finite else None
        else:
            chosen = finite[-1] if finite and math.isfinite(rows[-1]["val_loss"]) else None
        if state == TrialState.COMPLETE and chosen is not None:
            study.tell(trial, chosen["val_loss"])
        elif state == TrialState.PRUNED:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.FAIL)
        if service:
            peers.add(study.get_trials(deepcopy=False)[-1:])
        complete = study.get_trials(deepcopy=False)[-1].state == TrialState.COMPLETE
        log.append(
            {
                "epochs": len(rows),
                "cpu": time.process_time() - began_cpu,
                "wall": time.perf_counter() - began,
                "value": chosen["val_loss"] if complete and chosen else math.nan,
                "accuracy": chosen["val_accuracy"] if complete and chosen else math.nan,
                "ended": end,
            }
        )
    return log


def best_accuracy(log: list[dict]) -> list[float]:
    """After each trial, the val_accuracy of the best (lowest val_loss) complete trial."""
    out, best, accuracy = [], math.inf, math.nan
    for entry in log:
        if math.isfinite(entry["value"]) and entry["value"] < best:
            best, accuracy = entry["value"], entry["accuracy"]
        out.append(accuracy)
    return out


def to_quality(log: list[dict], target: float) -> dict[str, float]:
    spent = {"epochs": 0.0, "cpu": 0.0, "wall": 0.0}
    for entry, accuracy in zip(log, best_accuracy(log), strict=True):
        for key in spent:
            spent[key] += entry[key]
        if accuracy >= target:
            break
    return spent


def target_of(finals: list[float]) -> float:
    """A seed's quality target: the better of the two final accuracies - TOLERANCE."""
    return max(a for a in finals if math.isfinite(a)) - TOLERANCE


def reached(seed: dict[str, Any]) -> tuple[bool, bool]:
    """Whether each side's final best met the seed's target (`target_of`)."""
    target = target_of(seed["final"])
    return tuple(math.isfinite(a) and a >= target for a in seed["final"])  # type: ignore[return-value]


def summary(results: dict[str, Any], title: str) -> Table:
    table = Table(title=f"time to quality: {title}, early stopping off", box=box.MARKDOWN)
    columns = ("task", "epochs", "CPU s", "wall s", "final acc svc / opt", "p (epochs)")
    for column in (*columns, "reached svc / opt"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, result in results.items():
        ratios, final = result["ratios"], result["final"]
        hits = [reached(seed) for seed in result["seeds"]]
        table.add_row(
            task,
            f"{ratios['epochs']:.2f}x",
            f"{ratios['cpu']:.2f}x",
            f"{ratios['wall']:.2f}x",
            f"{final[0]:.4f} / {final[1]:.4f}",
            f"{result['p_epochs']:.3f}",
            f"{sum(h[0] for h in hits)} / {sum(h[1] for h in hits)} of {len(hits)}",
        )
    return table


def wilcoxon(a: list[float], b: list[float]) -> float:
    from scipy.stats import wilcoxon as test

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if all(d == 0 for d in diffs):
        return 1.0
    return float(test(a, b).pvalue)


def prepare() -> None:
    """Quiet Optuna and warnings, one torch thread, and the datasets with synthetic4."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    trainable.load_dataset = load  # type: ignore[assignment]  # adds synthetic4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--start", choices=("none", "defaults"), default="none", help="sampler.start"
    )
    parser.add_argument(
        "--sampler", choices=("tpe", "gp"), default="tpe", help="the service's sampler"
    )
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--summarize", type=Path, help="print the table of a --json file")
    args = parser.parse_args()
    if args.summarize:
        try:
            saved = json.loads(args.summarize.read_text())
        except (OSError, ValueError) as e:
            parser.error(f"--summarize {args.summarize}: not a readable --json file ({e})")
        Console(width=160).print(summary(saved, "saved in " + str(args.summarize)))
        return
    prepare()
    results: dict[str, Any] = {}
    for task in args.tasks.split(","):
        rows = []
        trainable.train(  # load the data and warm torch up before anything is timed
            {"lr": 0.01, "batch_size": 64, "depth": 1, "width": 8},
            "cpu",
            lambda *_: None,
            dataset=task,
            epochs=1,
        )
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs = {}
            for service in (seed % 2 == 0, seed % 2 == 1):  # alternate who goes first
                runs[service] = run_study(
                    task,
                    seed,
                    service=service,
                    trials=args.trials,
                    epochs=args.epochs,
                    start=args.start,
                    sampler=args.sampler,
                )
            svc, opt = runs[True], runs[False]
            finals = [best_accuracy(svc)[-1], best_accuracy(opt)[-1]]
            target = target_of(finals)
            rows.append(
                {
                    "seed": seed,
                    "service": to_quality(svc, target),
                    "optuna": to_quality(opt, target),
                    "final": finals,
                    "total_epochs": [sum(e["epochs"] for e in svc), sum(e["epochs"] for e in opt)],
                    "ended": sum(e["ended"] for e in svc),
                }
            )
            print(task, seed, rows[-1], flush=True)
        ratios = {
            key: math.exp(
                statistics.mean(math.log(r["service"][key] / r["optuna"][key]) for r in rows)
            )
            for key in ("epochs", "cpu", "wall")
        }
        p = wilcoxon([r["service"]["epochs"] for r in rows], [r["optuna"]["epochs"] for r in rows])
        final = [statistics.mean(r["final"][i] for r in rows) for i in (0, 1)]
        results[task] = {"ratios": ratios, "p_epochs": p, "final": final, "seeds": rows}
    title = (
        f"seeds {args.first_seed}-{args.first_seed + args.seeds - 1} x {args.trials} trials"
        f" x {args.epochs} epochs, start {args.start}, sampler {args.sampler}"
    )
    Console(width=160).print(summary(results, title))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
