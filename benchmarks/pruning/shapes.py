"""Shape benchmark (issue 11): generated learning-curve families that real studies have and
`curves/` lacks, replayed through the default pruner, MedianPruner(5, 5) and NopPruner.

Every family is seeded (`--seed`), 30 runs of 30 epochs, each a healthy curve
`floor + (start - floor) exp(-t / tau)` with its own floor and speed (so the runs rank), bent
into the family's shape; true divergences carry their onset epoch. Families:

    warm-up       lr warm-up of 2-5 epochs (`warmup_epochs` param, rising `lr`): a 2-8% dip,
                  a rise during the warm-up, then the fall to the floor
    sgdr          cosine restarts every 8 epochs: the loss jumps back up at each restart
    noisy         small-batch noise (5-10% of the level) and one-epoch outlier grad_norm spikes
    step-decay    late bloomers: a plateau until the lr steps down at epochs 10 and 20
    overfitting   the best at epoch 6-14, then val rises while train_loss keeps falling
    scale x1e-4, scale x1e4   the divergences family multiplied by 1e-4 and 1e4
    negative      the divergences family minus 5 (a shifted loss, every value < 0)
    zero-crossing every curve minus 0.5 x its floor's distance to the start... crossing 0
    accuracy      a maximized accuracy; 4 collapse to chance (true divergences), 4 stay there
    divergences   healthy runs plus NaN, x100 explosion, rebound (3.2 -> 1.8 -> 2.5 ...) and
                  stalled (too-small lr) runs, 4 of each

Reporting modes: `full` (metric, train_loss, grad_norm, lr and params: the built-in
trainer) and `metric-only` (the metric alone, no params). The default pruner is asked through
`DivergencePruner.judge` on `Curve.from_rows`, the function the worker's Reporter calls (see
engine.py); MedianPruner and NopPruner through a real Optuna study.

Columns (sums over `--orders` random orders of each family):
    epochs: fraction of all epochs run.
    healthy diverged: healthy runs stopped by a divergence-type rule (non-finite,
        divergence, explosion), pruned or ended; Optuna's pruners do not label ("-").
    top-5 pruned: of the 5 best runs (by best value), pruned or ended > 1% off their best.
    best lost: orders in which a pruned run's best so far beat every recorded value.
    caught <= 2: true divergences stopped within 2 epochs of onset (NaN, explosion,
        rebound), of all; stall: mean stop epoch of the stalled runs.

    python benchmarks/pruning/shapes.py --orders 3
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from engine import Run, Stop, replay
from optuna.study import StudyDirection
from rich import box
from rich.console import Console
from rich.table import Table

from search.pruning import default_pruner

EPOCHS = 30
RUNS = 30
MODES = {"full": ("train_loss", "grad_norm", "lr"), "metric-only": ()}
DIVERGED = ("non-finite", "divergence", "explosion")


@dataclass
class Shape:
    val: np.ndarray
    train: np.ndarray
    grad: np.ndarray
    lr: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    kind: str = "healthy"  # healthy, nan, explosion, rebound, stall
    onset: int = 0  # 1-based epoch the divergence starts (0: healthy)

    def run(self, scale: float = 1.0, shift: float = 0.0) -> Run:
        rows = []
        for e in range(EPOCHS):
            rows.append(
                {
                    "epoch": e + 1,
                    "value": float(self.val[e] * scale + shift),
                    "train_loss": float(self.train[e] * scale + shift),
                    "grad_norm": float(self.grad[e]),
                    "lr": float(self.lr[e]),
                }
            )
        return Run(rows, self.params)


def healthy(rng: np.random.Generator, *, noise: float = 0.01) -> Shape:
    t = np.arange(EPOCHS, dtype=float)
    start = rng.uniform(2.0, 2.4)
    floor = rng.uniform(0.1, 0.9)
    tau = rng.uniform(2.0, 8.0)
    clean = floor + (start - floor) * np.exp(-t / tau)
    val = clean * (1 + rng.normal(0, noise, EPOCHS))
    train = clean * 0.95 * (1 + rng.normal(0, noise / 3, EPOCHS))
    grad = (0.5 + 2.0 * np.exp(-t / tau)) * (1 + rng.normal(0, 0.1, EPOCHS)).clip(0.5)
    lr = np.full(EPOCHS, 0.01)
    return Shape(val, train, grad, lr)


def warm_up(rng: np.random.Generator) -> Shape:
    s = healthy(rng)
    warm = int(rng.integers(2, 6))
    t = np.arange(EPOCHS, dtype=float)
    start, floor = s.val[0], s.val[-1]
    dip = start * (1 - rng.uniform(0.02, 0.08))
    spike = dip * (1 + rng.uniform(0.02, 0.15))
    curve = np.empty(EPOCHS)
    curve[0], curve[1] = start, dip
    curve[2 : warm + 2] = np.linspace(dip, spike, warm)
    tail = t[warm + 2 :] - (warm + 2)
    curve[warm + 2 :] = floor + (spike - floor) * np.exp(-tail / rng.uniform(1.5, 5.0))
    s.val = curve * (1 + rng.normal(0, 0.01, EPOCHS))
    s.train = curve * 1.03
    s.lr = np.array([0.01 * min(1.0, (e + 1) / (warm + 1)) for e in range(EPOCHS)])
    s.params = {"warmup_epochs": warm, "schedule": "constant"}
    return s


def sgdr(rng: np.random.Generator) -> Shape:
    s = healthy(rng)
    cycle = 8
    jump = rng.uniform(0.2, 0.6)
    curve = s.val.copy()
    for restart in range(cycle, EPOCHS, cycle):
        gained = curve[0] - curve[restart - 1]
        bump = jump * gained * np.exp(-np.arange(EPOCHS - restart) / 1.5)
        curve[restart:] += bump
    s.val, s.train = curve, curve * 0.95
    s.lr = np.array([0.005 * (1 + math.cos(math.pi * (e % cycle) / cycle)) for e in range(EPOCHS)])
    s.params = {"schedule": "sgdr"}
    return s


def noisy(rng: np.random.Generator) -> Shape:
    s = healthy(rng, noise=rng.uniform(0.05, 0.1))
    for e in rng.choice(np.arange(3, EPOCHS), size=3, replace=False):
        s.grad[e] *= rng.uniform(30, 50)  # one outlier batch: the epoch's max grad_norm
    return s


def step_decay(rng: np.random.Generator) -> Shape:
    s = healthy(rng)
    start, floor = s.val[0], s.val[-1]
    levels = [start * rng.uniform(0.55, 0.8), 0.5 * (start + floor) * 0.7, floor]
    curve = np.empty(EPOCHS)
    for e in range(EPOCHS):
        level = levels[min(2, e // 10)]
        previous = start if e < 10 else levels[e // 10 - 1]
        curve[e] = level + (previous - level) * math.exp(-(e % 10) / 1.0)
    s.val = curve * (1 + rng.normal(0, 0.015, EPOCHS))
    s.train = curve * 0.95
    s.lr = np.array([0.1 * 0.1 ** (e // 10) for e in range(EPOCHS)])
    s.params = {"schedule": "step"}
    return s


def overfit(rng: np.random.Generator) -> Shape:
    s = healthy(rng)
    best_at = int(rng.integers(6, 15))
    rise = rng.uniform(0.01, 0.04)
    curve = s.val.copy()
    for e in range(best_at, EPOCHS):
        curve[e] = curve[best_at - 1] * (1 + rise * (e - best_at + 1) ** 1.3)
    s.val = curve
    s.train = s.train * np.linspace(1.0, 0.5, EPOCHS)
    return s


def diverging(rng: np.random.Generator, kind: str) -> Shape:
    s = healthy(rng)
    onset = int(rng.integers(3, 12))
    if kind == "nan":
        s.val[onset - 1 :] = np.nan
        s.train[onset - 1 :] = np.nan
        s.grad[onset - 1 :] = np.nan
    elif kind == "explosion":
        s.val[onset - 1 :] *= 100
        s.train[onset - 1 :] *= 100
        s.grad[onset - 1 :] *= 100
    elif kind == "rebound":
        base = s.val[onset - 2]
        start = s.val[0]
        for e in range(onset - 1, EPOCHS):
            s.val[e] = base + (start - base) * min(1.5, 0.5 + 0.15 * (e - onset + 1))
        s.train[onset - 1 :] = s.val[onset - 1 :] * 0.95
        s.grad[onset - 1 :] *= 20
    elif kind == "stall":
        start = s.val[0]
        s.val = start * (1 + rng.normal(0, 0.003, EPOCHS))
        s.train = s.val * 1.01
        onset = 1
    s.kind, s.onset = kind, onset
    return s


def divergences(rng: np.random.Generator) -> list[Shape]:
    shapes = [healthy(rng) for _ in range(RUNS - 16)]
    for kind in ("nan", "explosion", "rebound", "stall"):
        shapes += [diverging(rng, kind) for _ in range(4)]
    return shapes


def accuracy(rng: np.random.Generator) -> list[Shape]:
    """A maximized accuracy: 1 - loss / 2.4 (chance 0.1 at the start); 4 runs collapse to
    chance at their onset, 4 stay at chance (a stall)."""
    shapes = [healthy(rng) for _ in range(RUNS - 8)]
    shapes += [diverging(rng, "rebound") for _ in range(4)]
    shapes += [diverging(rng, "stall") for _ in range(4)]
    for s in shapes:
        s.val = 0.1 + 0.9 * (1 - s.val / 2.4).clip(0, 1)
        if s.kind == "rebound":
            s.val[s.onset - 1 :] = 0.1 + rng.normal(0, 0.01, EPOCHS - s.onset + 1)
    return shapes


FAMILIES: dict[str, tuple[Callable[[np.random.Generator], list[Shape]], dict[str, Any]]] = {
    "warm-up": (lambda rng: [warm_up(rng) for _ in range(RUNS)], {}),
    "sgdr": (lambda rng: [sgdr(rng) for _ in range(RUNS)], {}),
    "noisy": (lambda rng: [noisy(rng) for _ in range(RUNS)], {}),
    "step-decay": (lambda rng: [step_decay(rng) for _ in range(RUNS)], {}),
    "overfitting": (lambda rng: [overfit(rng) for _ in range(RUNS)], {}),
    "divergences": (divergences, {}),
    "scale x1e-4": (divergences, {"scale": 1e-4}),
    "scale x1e4": (divergences, {"scale": 1e4}),
    "negative": (divergences, {"shift": -5.0}),
    "zero-crossing": (divergences, {"shift": -1.0}),
    "accuracy": (accuracy, {"direction": StudyDirection.MAXIMIZE}),
}
PRUNERS: dict[str, Callable[[], Any]] = {
    "default_pruner()": default_pruner,
    "MedianPruner(5, 5)": lambda: optuna.pruners.MedianPruner(5, 5),
    "NopPruner": optuna.pruners.NopPruner,
}


def evaluate(
    shapes: list[Shape], make: Callable[[], Any], mode: str, orders: int, **how: Any
) -> tuple[dict[str, float], list[list[Stop]]]:
    direction = how.get("direction", StudyDirection.MINIMIZE)
    scale, shift = how.get("scale", 1.0), how.get("shift", 0.0)
    runs = [s.run(scale, shift) for s in shapes]
    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    best = np.array([np.nanmin(sign * np.array([r["value"] for r in run.rows])) for run in runs])
    top = np.argsort(best)[:5]
    out = {"epochs": 0.0, "healthy_diverged": 0, "top5": 0, "lost": 0, "caught": 0}
    out |= {"divergent": 0, "stall_stop": 0.0, "stalls": 0}
    every = []
    for seed in range(orders):
        order = np.random.default_rng(seed).permutation(len(runs))
        stops = replay(
            runs,
            make,
            order,
            metric="value",
            direction=direction,
            keys=MODES[mode],
            with_params=mode == "full",
        )
        every.append(stops)
        out["epochs"] += sum(s.epochs for s in stops) / (EPOCHS * len(stops) * orders)
        recorded = [sign * s.value for s in stops if s.state != "pruned"]
        study_best = min(recorded) if recorded else math.inf
        for i, (shape, stop) in enumerate(zip(shapes, stops, strict=True)):
            sofar = np.nanmin(sign * np.array([r["value"] for r in runs[i].rows[: stop.epochs]]))
            off = stop.state == "pruned" or sign * stop.value > best[i] + 0.01 * abs(best[i])
            if i in top and off:
                out["top5"] += 1
            if shape.kind == "healthy" and stop.rule in DIVERGED:
                out["healthy_diverged"] += 1
            if shape.kind in ("nan", "explosion", "rebound"):
                out["divergent"] += 1
                stopped = stop.epochs < EPOCHS
                out["caught"] += int(stopped and stop.epochs - shape.onset <= 2)
            if shape.kind == "stall":
                out["stalls"] += 1
                out["stall_stop"] += stop.epochs
            if stop.state == "pruned" and sofar < study_best:
                out["lost"] += 1
                study_best = -math.inf  # count once per order
    out["stall_stop"] = out["stall_stop"] / out["stalls"] if out["stalls"] else math.nan
    return out, every


def signature(stops: list[list[Stop]]) -> list[tuple[int, str, str]]:
    return [(s.epochs, s.state, s.rule) for order in stops for s in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    console = Console(width=220)
    results: dict[str, Any] = {}
    for mode in MODES:
        table = Table(title=f"shapes, {mode} reporting, {args.orders} orders", box=box.MARKDOWN)
        for column in (
            "family",
            "pruner",
            "epochs",
            "healthy diverged",
            "top-5 pruned",
            "best lost",
            "caught <= 2",
            "stall stop",
        ):
            table.add_column(column, justify="left" if column in ("family", "pruner") else "right")
        same: dict[str, list] = {}
        for family, (build, how) in FAMILIES.items():
            shapes = build(np.random.default_rng(args.seed))
            for name, make in PRUNERS.items():
                r, stops = evaluate(shapes, make, mode, args.orders, **how)
                if name == "default_pruner()" and family.startswith(("divergences", "scale")):
                    same[family] = signature(stops)
                results[f"{mode} / {family} / {name}"] = r
                labels = name == "default_pruner()"
                table.add_row(
                    family,
                    name,
                    f"{r['epochs']:.3f}",
                    str(r["healthy_diverged"]) if labels else "-",
                    str(r["top5"]),
                    str(r["lost"]),
                    f"{r['caught']}/{r['divergent']}" if r["divergent"] else "-",
                    f"{r['stall_stop']:.1f}" if r["stalls"] else "-",
                )
        console.print(table)
        identical = all(same[k] == same["divergences"] for k in same)
        console.print(f"{mode}: decisions at x1e-4 and x1e4 identical to x1: {identical}")
        results[f"{mode} / scale identical"] = identical
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
