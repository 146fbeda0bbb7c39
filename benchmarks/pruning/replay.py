"""Replay the recorded learning curves through Optuna studies, once per pruner and order.

Each study holds the curves of one task and one part (tuning or held-out) in a random order.
Every curve is one trial that reports `val_loss` epoch by epoch the way `search.objective`'s
Reporter does (`trial.report`, then the `epoch_metrics` user attribute, then `should_prune`),
but without the Reporter's own non-finite guard, so each pruner is judged alone. A trial that
is never pruned completes with its best finite `val_loss` (the worker's trial value).

Columns, per pruner, over all studies of a part:
    epochs: epochs run as a fraction of running every curve for 40 epochs.
    regret: best completed value minus the best curve's value, mean over studies.
    top-5 pruned: of the 5 best curves of each study (by best val_loss), how many were pruned
        (mean per study).
    NaN waste: epochs run after the first non-finite val_loss/train_loss/grad_norm, per study.
    rebound stop: mean epoch at which rebounding curves were stopped (40 = never).
    n rebound: rebounding curves per study (see `rebounds`).

    python benchmarks/pruning/replay.py --orders 5          # both parts, all pruners
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from rich import box
from rich.console import Console
from rich.table import Table

from search.pruning import DivergencePruner, TrendPruner, default_pruner

HERE = Path(__file__).resolve().parent
EPOCHS = 40
TOP = 5


@dataclass(frozen=True)
class Pool:
    """The curves of one task and part: arrays [curve, epoch]."""

    task: str
    classes: int
    val: np.ndarray
    train: np.ndarray
    grad: np.ndarray

    @property
    def best(self) -> np.ndarray:
        finite = np.where(np.isfinite(self.val), self.val, np.inf)
        return finite.min(axis=1)

    @property
    def first_bad(self) -> np.ndarray:
        """1-based epoch of the first non-finite metric, or EPOCHS + 1."""
        bad = ~(np.isfinite(self.val) & np.isfinite(self.train) & np.isfinite(self.grad))
        return np.where(bad.any(axis=1), bad.argmax(axis=1) + 1, EPOCHS + 1)


def rebounds(pool: Pool) -> np.ndarray:
    """Curves whose val_loss fell to at most 80% of its first value, then rose back above
    1.5 x that best, with train_loss also above its own best by 1.5 x, or went non-finite."""
    out = np.zeros(len(pool.val), dtype=bool)
    for i, (val, train) in enumerate(zip(pool.val, pool.train, strict=True)):
        finite = np.isfinite(val) & np.isfinite(train)
        n = int(finite.argmin()) if not finite.all() else EPOCHS
        if n < 2:
            continue
        v, t = val[:n], train[:n]
        best_v, best_t = np.minimum.accumulate(v), np.minimum.accumulate(t)
        fell = best_v <= 0.8 * v[0]
        rose = (v > 1.5 * best_v) & (t > 1.5 * best_t) & fell
        out[i] = bool(rose.any() or (fell.any() and n < EPOCHS))
    return out


def load_pools(path: Path, part: int) -> list[Pool]:
    data = np.load(path)
    curves, task, split = data["curves"], data["task"], data["split"]
    metrics = list(data["metrics"])
    pools = []
    for task_id, name in enumerate(data["tasks"]):
        chosen = curves[(task == task_id) & (split == part)]
        if len(chosen) == 0:
            continue
        classes = {"wine": 3, "breast_cancer": 2, "digits": 10, "synthetic": 4}[str(name)]
        pools.append(
            Pool(
                str(name),
                classes,
                chosen[:, metrics.index("val_loss")].astype(np.float64),
                chosen[:, metrics.index("train_loss")].astype(np.float64),
                chosen[:, metrics.index("grad_norm")].astype(np.float64),
            )
        )
    return pools


def replay(pool: Pool, pruner: optuna.pruners.BasePruner, order: np.ndarray) -> np.ndarray:
    """Run the curves in `order`; return the epoch each curve stopped at (negative = pruned)."""
    study = optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(0))
    stops = np.zeros(len(pool.val), dtype=np.int64)
    for i in order:
        trial = study.ask()
        history: list[dict[str, float]] = []
        stop, pruned = EPOCHS, False
        for epoch in range(1, EPOCHS + 1):
            value = float(pool.val[i, epoch - 1])
            trial.report(value, epoch)
            history.append(
                {
                    "epoch": epoch,
                    "val_loss": value,
                    "train_loss": float(pool.train[i, epoch - 1]),
                    "grad_norm": float(pool.grad[i, epoch - 1]),
                }
            )
            trial.set_user_attr("epoch_metrics", history)
            if trial.should_prune():
                stop, pruned = epoch, True
                break
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif math.isfinite(pool.best[i]):
            study.tell(trial, float(pool.best[i]))
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        stops[i] = -stop if pruned else stop
    return stops


def score(pool: Pool, stops: np.ndarray) -> dict[str, float]:
    ran = np.abs(stops)
    pruned = stops < 0
    best = pool.best
    completed = np.where(~pruned & np.isfinite(best), best, np.inf)
    top = np.argsort(best)[:TOP]
    bad = pool.first_bad
    rebound = rebounds(pool)
    return {
        "epochs": ran.sum() / (EPOCHS * len(ran)),
        "regret": float(completed.min() - best.min()),
        "top5": float(pruned[top].sum()),
        "nan_waste": float(np.clip(ran - bad, 0, None).sum()),
        "rebound_stop": float(ran[rebound].mean()) if rebound.any() else math.nan,
        "n_rebound": float(rebound.sum()),
    }


def optuna_pruners(pool: Pool) -> dict[str, Callable[[], optuna.pruners.BasePruner]]:
    pruners = optuna.pruners
    return {
        "NopPruner": pruners.NopPruner,
        "MedianPruner(5, 5)": lambda: pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5),
        "PercentilePruner(25, 5, 5)": lambda: pruners.PercentilePruner(
            25.0, n_startup_trials=5, n_warmup_steps=5
        ),
        "SuccessiveHalvingPruner()": pruners.SuccessiveHalvingPruner,
        "HyperbandPruner(1, 40, 3)": lambda: pruners.HyperbandPruner(1, EPOCHS, 3),
        "ThresholdPruner(ln C, 5)": lambda: pruners.ThresholdPruner(
            upper=math.log(pool.classes), n_warmup_steps=5
        ),
        "PatientPruner(Median, 3)": lambda: pruners.PatientPruner(
            pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5), patience=3
        ),
    }


def own_pruners() -> dict[str, Callable[[], optuna.pruners.BasePruner]]:
    one = {
        f"rule: {rule}": (lambda rule=rule: DivergencePruner(None, rules=(rule,)))
        for rule in ("non-finite", "divergence", "explosion", "stall")
    }
    return {
        "default_pruner()": default_pruner,
        **one,
        "rule: comparative (TrendPruner)": TrendPruner,
        "own-curve rules only": lambda: DivergencePruner(None),
    }


def run(
    pools: list[Pool],
    factories: dict[str, Callable[[Pool], Callable[[], optuna.pruners.BasePruner]]],
    orders: int,
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name, factory in factories.items():
        rows = []
        for pool in pools:
            for seed in range(orders):
                order = np.random.default_rng(seed).permutation(len(pool.val))
                rows.append(score(pool, replay(pool, factory(pool)(), order)))
        results[name] = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    return results


def table(title: str, results: dict[str, dict[str, float]]) -> Table:
    out = Table(title=title, box=box.MARKDOWN)
    for column in ("pruner", "epochs", "regret", "top-5 pruned", "NaN waste", "rebound stop"):
        out.add_column(column, justify="left" if column == "pruner" else "right")
    for name, r in results.items():
        out.add_row(
            name,
            f"{r['epochs']:.3f}",
            f"{r['regret']:.4f}",
            f"{r['top5']:.2f}",
            f"{r['nan_waste']:.1f}",
            f"{r['rebound_stop']:.1f}",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=HERE / "curves.npz")
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--part", choices=["tuning", "held-out", "both"], default="both")
    parser.add_argument("--only", help="comma-separated pruner names (substring match)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    parts = {"tuning": 0, "held-out": 1}
    chosen = parts if args.part == "both" else {args.part: parts[args.part]}
    console = Console(width=200)
    everything = {}
    for part, code in chosen.items():
        pools = load_pools(args.curves, code)
        factories: dict[str, Callable[[Pool], Callable[[], optuna.pruners.BasePruner]]] = {
            name: (lambda _pool, f=f: f) for name, f in own_pruners().items()
        }
        for name in optuna_pruners(pools[0]):
            factories[name] = lambda pool, name=name: optuna_pruners(pool)[name]
        if args.only:
            wanted = args.only.split(",")
            factories = {k: v for k, v in factories.items() if any(w in k for w in wanted)}
        began = time.perf_counter()
        results = run(pools, factories, args.orders)
        n = sum(len(p.val) for p in pools)
        console.print(
            table(
                f"{part}: {n} curves ({', '.join(p.task for p in pools)}), "
                f"{args.orders} orders, {time.perf_counter() - began:.0f}s",
                results,
            )
        )
        rebound = sum(int(rebounds(p).sum()) for p in pools)
        console.print(f"{rebound} rebounding curves in this part")
        everything[part] = results
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
