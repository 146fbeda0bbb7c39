"""Replay the recorded real learning curves through each pruner, per part, order and mode.

Each study holds the curves of one task and one part (tuning, held-out, fresh held-out, or
`fresh-2`, generated after the defaults of issue 11 were frozen; see make_curves.py) in a
random order, replayed by `engine.replay`: `search` pruners through `judge` on
`Curve.from_rows` as the worker's Reporter calls it (an `end` verdict records the trial
COMPLETE at its best so far), Optuna's through a real Optuna study.

Modes: `full` reports val_loss, train_loss, grad_norm and lr (the built-in trainer's rows, lr
recomputed from the stored params with `trainable.lr_at`) and the params; `metric-only`
reports val_loss alone and no params (a user function that reports only its metric).

Columns, per pruner, over all studies of a part (means per study):
    epochs: epochs run as a fraction of running every curve for 40 epochs.
    regret: best recorded value minus the best curve's value.
    top-5 killed: of the 5 best curves (by best val_loss), how many were pruned, or ended
        with a recorded value worse than their true best by more than 1% of it.
    NaN waste: epochs run after the first non-finite val_loss/train_loss/grad_norm.
    rebound stop: mean epoch at which rebounding curves were stopped (40 = never).

    python benchmarks/pruning/replay.py --orders 5 --json benchmarks/pruning/replay.json
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
from typing import Any

import numpy as np
import optuna
from engine import Run, Stop, TopKAfterOneEpoch, replay
from make_curves import FRESH
from optuna.study import StudyDirection
from rich import box
from rich.console import Console
from rich.table import Table

from search.pruning import DivergencePruner, TrendPruner, default_pruner
from search.trainable import lr_at

HERE = Path(__file__).resolve().parent
#: the epochs every recorded curve was trained for (its lr schedule spans them)
TRAINED = 40
#: the epochs a replayed trial runs: `--epochs N` replays the first N of each curve (a
#: study of N-epoch trials; the lr is still the 40-epoch schedule's)
EPOCHS = TRAINED
TOP = 5
#: the `split` values of the curve files: see make_curves.py
PARTS = {"tuning": 0, "held-out": 1, "fresh held-out": 2}
PARTS |= {f"fresh-{part - 1}": part for part, _ in list(FRESH.values())[1:]}  # *-c, *-d, ...
MODES = {"full": ("train_loss", "grad_norm", "lr"), "metric-only": ()}
#: the recorded metrics a `Pool` keeps, in its field order
METRICS = ("val_loss", "train_loss", "grad_norm")


@dataclass(frozen=True)
class Pool:
    """The curves of one task and part: arrays [curve, epoch], and each curve's params."""

    task: str
    classes: int
    val: np.ndarray
    train: np.ndarray
    grad: np.ndarray
    params: list[dict[str, Any]]

    @classmethod
    def of(
        cls,
        task: str,
        classes: int,
        curves: np.ndarray,
        metrics: list[str],
        params: list[dict[str, Any]],
    ) -> Pool:
        """A pool from a curve file's arrays: `curves` [curve, metric, epoch] in the order
        of `metrics`."""
        val, train, grad = (curves[:, metrics.index(m)] for m in METRICS)
        return cls(task, classes, val, train, grad, params)

    @property
    def best(self) -> np.ndarray:
        finite = np.where(np.isfinite(self.val), self.val, np.inf)
        return finite.min(axis=1)

    @property
    def first_bad(self) -> np.ndarray:
        """1-based epoch of the first non-finite metric, or EPOCHS + 1."""
        bad = ~(np.isfinite(self.val) & np.isfinite(self.train) & np.isfinite(self.grad))
        return np.where(bad.any(axis=1), bad.argmax(axis=1) + 1, EPOCHS + 1)

    def runs(self) -> list[Run]:
        out = []
        for i, params in enumerate(self.params):
            rows = []
            for e in range(EPOCHS):
                lr = lr_at(
                    e,
                    base_lr=float(params["lr"]),
                    epochs=TRAINED,
                    schedule=str(params.get("schedule", "constant")),
                    warmup_epochs=int(params.get("warmup_epochs", 0)),
                    step_gamma=float(params.get("step_gamma", 0.5)),
                )
                rows.append(
                    {
                        "epoch": e + 1,
                        "val_loss": float(self.val[i, e]),
                        "train_loss": float(self.train[i, e]),
                        "grad_norm": float(self.grad[i, e]),
                        "lr": lr,
                    }
                )
            out.append(Run(rows, params))
        return out


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
        chosen = data["split"] == part
        if not chosen.any():
            continue
        curves = data["curves"][chosen].astype(np.float64)[:, :, :EPOCHS]
        params = [p for p, c in zip(json.loads(str(data["params"])), chosen, strict=True) if c]
        pools.append(Pool.of(path.stem, int(data["classes"]), curves, metrics, params))
    return pools


def score(pool: Pool, stops: list[Stop]) -> dict[str, float]:
    ran = np.array([s.epochs for s in stops])
    pruned = np.array([s.state == "pruned" for s in stops])
    recorded = np.array([s.value if s.state != "pruned" else np.inf for s in stops])
    recorded = np.where(np.isfinite(recorded), recorded, np.inf)
    best = pool.best
    top = np.argsort(best)[:TOP]
    lost = pruned | (recorded > best + 0.01 * np.abs(best))
    bad = pool.first_bad
    rebound = rebounds(pool)
    return {
        "epochs": ran.sum() / (EPOCHS * len(ran)),
        "regret": float(recorded.min() - best.min()),
        "top5": float(lost[top].sum()),
        "nan_waste": float(np.clip(ran - bad, 0, None).sum()),
        "rebound_stop": float(ran[rebound].mean()) if rebound.any() else math.nan,
        "ended": float(sum(s.state == "ended" for s in stops)),
    }


def pruners(pool: Pool) -> dict[str, Callable[[], Any]]:
    p = optuna.pruners
    own = {
        f"rule: {rule}": (lambda rule=rule: DivergencePruner(None, rules=(rule,)))
        for rule in ("non-finite", "divergence", "explosion", "stall", "overfitting")
    }
    return {
        "default_pruner()": default_pruner,
        **own,
        "rule: comparative (TrendPruner)": TrendPruner,
        "own-curve rules only": lambda: DivergencePruner(None),
        "NopPruner": p.NopPruner,
        "MedianPruner(5, 5)": lambda: p.MedianPruner(n_startup_trials=5, n_warmup_steps=5),
        "PercentilePruner(25, 5, 5)": lambda: p.PercentilePruner(
            25.0, n_startup_trials=5, n_warmup_steps=5
        ),
        "top-20%-after-1-epoch": TopKAfterOneEpoch,
        "SuccessiveHalving/ASHA()": p.SuccessiveHalvingPruner,
        "HyperbandPruner(1, 40, 3)": lambda: p.HyperbandPruner(1, EPOCHS, 3),
        "WilcoxonPruner(0.1, 5)": lambda: p.WilcoxonPruner(p_threshold=0.1, n_startup_steps=5),
        "ThresholdPruner(ln C, 5)": lambda: p.ThresholdPruner(
            upper=math.log(pool.classes), n_warmup_steps=5
        ),
        "PatientPruner(Median, 3)": lambda: p.PatientPruner(
            p.MedianPruner(n_startup_trials=5, n_warmup_steps=5), patience=3
        ),
    }


def run(pools: list[Pool], names: list[str], orders: int, mode: str) -> dict[str, dict]:
    results: dict[str, dict[str, float]] = {}
    runs = {pool.task: pool.runs() for pool in pools}
    for name in names:
        rows = []
        for pool in pools:
            make = pruners(pool)[name]
            for seed in range(orders):
                order = np.random.default_rng(seed).permutation(len(pool.val))
                stops = replay(
                    runs[pool.task],
                    make,
                    order,
                    metric="val_loss",
                    direction=StudyDirection.MINIMIZE,
                    keys=MODES[mode],
                    with_params=mode == "full",
                    name=f"replay-{pool.task}",
                )
                rows.append(score(pool, stops))
        results[name] = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    return results


def table(title: str, results: dict[str, dict[str, float]]) -> Table:
    out = Table(title=title, box=box.MARKDOWN)
    columns = ("pruner", "epochs", "regret", "top-5 killed", "NaN waste", "rebound stop", "ended")
    for column in columns:
        out.add_column(column, justify="left" if column == "pruner" else "right")
    for name, r in results.items():
        out.add_row(
            name,
            f"{r['epochs']:.3f}",
            f"{r['regret']:.4f}",
            f"{r['top5']:.2f}",
            f"{r['nan_waste']:.1f}",
            f"{r['rebound_stop']:.1f}",
            f"{r['ended']:.1f}",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=HERE / "curves")
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--mode", choices=[*MODES, "all"], default="full")
    parser.add_argument("--only", help="comma-separated pruner names (substring match)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--epochs", type=int, default=TRAINED, help="replay the first N epochs of each curve"
    )
    args = parser.parse_args()
    if not 1 <= args.epochs <= TRAINED:
        parser.error(f"--epochs must be in [1, {TRAINED}], but got {args.epochs}")
    global EPOCHS
    EPOCHS = args.epochs
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    parts = PARTS if args.part == "all" else {args.part: PARTS[args.part]}
    modes = list(MODES) if args.mode == "all" else [args.mode]
    console = Console(width=200)
    everything: dict[str, Any] = {}
    for part, code in parts.items():
        pools = load_pools(args.curves, code)
        if not pools:
            continue
        names = list(pruners(pools[0]))
        if args.only:
            names = [n for n in names if any(w in n for w in args.only.split(","))]
        for mode in modes:
            began = time.perf_counter()
            results = run(pools, names, args.orders, mode)
            n = sum(len(p.val) for p in pools)
            console.print(
                table(
                    f"{part}, {mode}: {n} curves ({', '.join(p.task for p in pools)}), "
                    f"{args.orders} orders, {time.perf_counter() - began:.0f}s",
                    results,
                )
            )
            everything[f"{part} / {mode}"] = results
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
