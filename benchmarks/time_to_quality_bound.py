"""How far below plain Optuna's time to quality can any pruner go? A perfect-foresight bound.

`time_to_quality.py` asks for <= 0.5x plain Optuna's epochs to quality with early stopping
off. This script bounds what a pruner can do there, on the same tasks, space, sampler and
seeds: the service's sampler (`search.study.make_sampler`, TPE) paired with an *oracle*
pruner that knows every trial's whole curve before it starts:

* each trial is trained for all its epochs first (uncharged), and its recorded value is its
  best val_loss (the service's recording; "end, don't lose" at the best epoch);
* a trial whose recorded val_accuracy meets the seed's target is charged up to its best
  epoch and told COMPLETE at its best value: it is the study's first trial of quality, and
  the study stops there;
* any other trial is charged **one epoch** and told PRUNED (its first val_loss reported),
  except the first `startup` trials, which a pruner with no complete peers cannot judge:
  they are charged every epoch and told COMPLETE at their best.

No pruner can spend fewer epochs to quality with the same sampler: a real one cannot know
which trial will reach quality, needs at least one epoch to judge a trial, and the
winning trial must run to its best epoch. `--startup 5` is MedianPruner's and the
service's default (5 complete trials before any comparison); `--startup 1` is a pruner that
compares from the second trial on; `--startup 0` the perfect oracle.

The target and plain Optuna's epochs to quality come from a saved `time_to_quality.py`
JSON of the same seeds (the target: the better of the two final accuracies - 0.005);
ratios are oracle / plain Optuna, geometric means over seeds, as there.

    python benchmarks/time_to_quality_bound.py --against benchmarks/time_to_quality-heldout.json \
        --json benchmarks/time_to_quality-bound.json   # ~20 min
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "pruning"))
from quality import perfect_verdict
from time_to_quality import SPEC, prepare, target_of

from search import space, trainable
from search.study import make_sampler


def oracle_study(
    task: str, seed: int, *, target: float, startup: int, trials: int, epochs: int
) -> dict[str, Any]:
    """Epochs an oracle pruner spends until the study's best trial meets `target`."""
    study = optuna.create_study(sampler=make_sampler(SPEC, seed=seed))
    spent, best = 0, math.inf
    for number in range(trials):
        trial = study.ask()
        params = space.suggest(trial, SPEC)
        rows: list[dict[str, float]] = []

        def report(_step: int, metrics: dict[str, float], rows: list = rows) -> None:
            rows.append({k: float(v) for k, v in metrics.items()})

        trainable.train(
            params,
            "cpu",
            report,
            dataset=task,
            epochs=epochs,
            seed=seed,
        )
        charged, value, won = perfect_verdict(
            [r["val_loss"] for r in rows],
            [r["val_accuracy"] for r in rows],
            len(rows),  # the trainer stops at the first non-finite epoch
            target=target,
            best=best,
            judged=number >= startup,
        )
        spent += charged
        if math.isfinite(value):
            study.tell(trial, value)
            best = min(best, value)
        elif number < startup:
            study.tell(trial, state=TrialState.FAIL)
        else:
            if rows and math.isfinite(rows[0]["val_loss"]):
                trial.report(rows[0]["val_loss"], 1)
            study.tell(trial, state=TrialState.PRUNED)
        if won:
            return {"epochs": spent, "trials": number + 1, "reached": True}
    return {"epochs": spent, "trials": trials, "reached": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, required=True, help="a time_to_quality JSON")
    parser.add_argument(
        "--startup", default="5,3,2,1,0", help="comma-separated counts of unjudged trials"
    )
    parser.add_argument("--trials", type=int, default=30, help="trials a study (its budget)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs a trial")
    parser.add_argument(
        "--tasks", default="digits,breast_cancer,synthetic4", help="comma-separated, in --against"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    try:
        startups = [int(s) for s in args.startup.split(",")]
    except ValueError:
        parser.error(f"--startup must be comma-separated integers, but got {args.startup!r}")
    if args.trials < 1 or args.epochs < 1:
        parser.error(f"--trials and --epochs must be >= 1, but got {args.trials}, {args.epochs}")
    if any(s < 0 for s in startups):
        parser.error(f"--startup must be >= 0, but got {args.startup!r}")
    try:
        saved = json.loads(args.against.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"--against {args.against}: not a readable time_to_quality JSON ({e})")
    tasks = args.tasks.split(",")
    if missing := [t for t in tasks if t not in saved]:
        parser.error(f"--tasks {missing} are not in {args.against} (it has {list(saved)})")
    prepare()
    out: dict[str, Any] = {}
    for task in tasks:
        for startup in startups:
            rows = []
            for seed in saved[task]["seeds"]:
                bound = oracle_study(
                    task,
                    seed["seed"],
                    target=target_of(seed["final"]),
                    startup=startup,
                    trials=args.trials,
                    epochs=args.epochs,
                )
                rows.append({**bound, "seed": seed["seed"], "optuna": seed["optuna"]["epochs"]})
            logs = [math.log(r["epochs"] / r["optuna"]) for r in rows]
            ratio = math.exp(statistics.mean(logs))
            above = sum(x > math.log(0.5) for x in logs)
            out.setdefault(task, {})[str(startup)] = {
                "ratio": ratio,
                "seeds_above_half": above,
                "seeds": rows,
            }
            print(
                f"{task}: oracle with {startup} unjudged trials = {ratio:.2f}x plain Optuna's "
                f"epochs to quality; {above} of {len(rows)} seeds above 0.5x",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
