"""Replay the recorded learning curves through Optuna studies, once per pruner and order.

Each study holds the curves of one task and one part (tuning, held-out or fresh held-out; see
make_curves.py) in a random order.
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
    rebound stop: mean epoch at which rebounding curves were stopped (40 = never; see
        `rebounds`).

    python benchmarks/pruning/replay.py --orders 5          # all parts, all pruners
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
#: the `split` values of the curve files: see make_curves.py
PARTS = {"tuning": 0, "held-out": 1, "fresh held-out": 2}


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
    """Curves that learned, then gave back half of it: after the best-so-far `b` fell below
    half the untrained loss `u = ln(classes)`, val_loss stayed above `b + (u - b) / 2` for 2
    epochs in a row, or went non-finite. (The pruners are not told `u`.)"""
    untrained = math.log(pool.classes)
    out = np.zeros(len(pool.val), dtype=bool)
    for i, val in enumerate(pool.val):
        best, run = math.inf, 0
        for value in val:
            learned = best < untrained / 2
            if not math.isfinite(value):
                out[i] = learned
                break
            run = run + 1 if learned and value > best + (untrained - best) / 2 else 0
            if run >= 2:
                out[i] = True
                break
            best = min(best, value)
    return out


def load_pools(folder: Path, part: int) -> list[Pool]:
    pools = []
    for path in sorted(folder.glob("*.npz")):
        data = np.load(path)
        metrics = list(data["metrics"])
        chosen = data["curves"][data["split"] == part].astype(np.float64)
        if len(chosen) == 0:
            continue
        pools.append(
            Pool(
                path.stem,
                int(data["classes"]),
                chosen[:, metrics.index("val_loss")],
                chosen[:, metrics.index("train_loss")],
                chosen[:, metrics.index("grad_norm")],
            )
        )
    return pools


def replay(pool: Pool, pruner: optuna.pruners.BasePruner, order: np.ndarray) -> np.ndarray:
    """Run the curves in `order`; return the epoch each curve stopped at (negative = pruned)."""
    study = optuna.create_study(  # a fixed name: Hyperband's brackets hash it
        study_name=f"replay-{pool.task}", pruner=pruner, sampler=optuna.samplers.RandomSampler(0)
    )
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
    parser.add_argument("--curves", type=Path, default=HERE / "curves")
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--only", help="comma-separated pruner names (substring match)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    chosen = PARTS if args.part == "all" else {args.part: PARTS[args.part]}
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
        nan = sum(int((p.first_bad <= EPOCHS).sum()) for p in pools)
        flat = sum(int((p.best >= 0.9 * math.log(p.classes)).sum()) for p in pools)
        console.print(
            f"{nan} curves go non-finite, {rebound} rebound (see `rebounds`), {flat} never get "
            f"below 90% of the untrained loss ln(classes)"
        )
        everything[part] = results
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
