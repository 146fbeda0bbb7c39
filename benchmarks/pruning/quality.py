"""Time to quality on the recorded curves: every pruner, and what no pruner can beat.

`time_to_quality.py` measures the service against plain Optuna with real training, 20 seeds
a task, ~15 minutes a run. This replays the recorded real curves instead (26 s for all
the pruners): each study is 30 curves drawn from one pool (a task of one part of
`curves/`, as replay.py), in a random order (a random sampler), cut to their first 15
epochs (`--epochs`), replayed through each pruner by `engine.replay` (this package's pruners
through `judge`, as the worker asks them; Optuna's through a real Optuna study).

Quality is the val_accuracy of the study's best trial so far at its recorded epoch, and "to
quality" the epochs spent until it is within 0.5% of the better of the two final qualities
compared (the pruner's and the reference's), the whole study when never, as
time_to_quality.py does. The reference is plain Optuna: `MedianPruner()` (5 startup trials,
no warm-up) with an objective that returns its last val_loss, so its trials are recorded at
their last epoch; every other pruner is recorded as the service records it, at the trial's
best val_loss epoch.

Bounds: `oracle (n unjudged)` is a pruner with perfect foresight: it knows every curve, charges
one epoch to every trial that will not become a study best of quality and runs the first
that will only to its best epoch, except that the first n trials, which no pruner can judge
(no complete peers), run until they end (or go non-finite). No pruner with n startup trials
can spend less; it is measured against the target the default pruner was held to. `oracle
(n unjudged, kills no top-5)` also runs each of the study's 5 best curves in full: the bound
for a pruner that meets the issue's kill target too (at most 1/5 of MedianPruner(5, 5)'s top-5
kills: 0.06 per study here, next to none).

Columns, per pruner over every study (pools x `--studies`):
    to quality: epochs to quality / the reference's, geometric mean; <= 0.5x: the share of
        studies where it is at most half the reference's.
    epochs: all epochs run / the reference's (the whole 30-trial study).
    top-5 killed: of the study's 5 best curves (by best val_loss), how many were pruned or
        ended > 1% worse than their best, per study (replay.py's measure).
    final: the final quality minus the reference's, mean.

    python benchmarks/pruning/quality.py --studies 3 --json benchmarks/pruning/quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import replay as replayed
from engine import Stop, TopKAfterOneEpoch, replay
from optuna.study import StudyDirection
from rich import box
from rich.console import Console
from rich.table import Table

from search.pruning import default_pruner

HERE = Path(__file__).resolve().parent
TRIALS = 30
TOLERANCE = 0.005
REFERENCE = "plain Optuna: MedianPruner(), last epoch"
STARTUPS = (5, 3, 2, 1, 0)
TOP = 5


@dataclass(frozen=True)
class Study:
    """One replayed study: its curves (in play order) and their val_accuracy per epoch."""

    pool: replayed.Pool
    accuracy: np.ndarray


@dataclass(frozen=True)
class Trace:
    """Per trial in play order: epochs run, and the study's quality after it."""

    epochs: list[int]
    quality: list[float]
    top5: float

    @property
    def final(self) -> float:
        return self.quality[-1]


def to_quality(epochs: Sequence[int], quality: Sequence[float], target: float) -> int:
    """Epochs spent until the study's quality meets `target` (all of them if never)."""
    spent = 0
    for ran, reached in zip(epochs, quality, strict=True):
        spent += ran
        if reached >= target:
            break
    return spent


def recorded(
    stop: Stop, val: np.ndarray, accuracy: np.ndarray, *, last: bool
) -> tuple[float, float]:
    """The value and val_accuracy a trial is recorded with: (inf, nan) when pruned."""
    if stop.state == "pruned":
        return math.inf, math.nan
    ran = val[: stop.epochs]
    if last:
        if not math.isfinite(ran[-1]):
            return math.inf, math.nan
        return float(ran[-1]), float(accuracy[stop.epochs - 1])
    finite = np.where(np.isfinite(ran), ran, np.inf)
    at = int(np.argmin(finite))
    return float(finite[at]), float(accuracy[at])


def trace(study: Study, make: Callable[[], Any], *, last: bool) -> Trace:
    pool = study.pool
    order = np.arange(len(pool.val))
    stops = replay(
        pool.runs(),
        make,
        order,
        metric="val_loss",
        direction=StudyDirection.MINIMIZE,
        keys=replayed.MODES["full"],
        with_params=True,
        name="quality",
    )
    best, quality, epochs, qualities = math.inf, math.nan, [], []
    for i, stop in enumerate(stops):
        value, accuracy = recorded(stop, pool.val[i], study.accuracy[i], last=last)
        if value < best:
            best, quality = value, accuracy
        epochs.append(stop.epochs)
        qualities.append(quality)
    return Trace(epochs, qualities, replayed.score(pool, stops)["top5"])


def perfect_verdict(
    val: Sequence[float],
    accuracy: Sequence[float],
    ran: int,
    *,
    target: float,
    best: float,
    judged: bool,
) -> tuple[int, float, bool]:
    """What a perfect-foresight pruner does with one trial that runs `ran` epochs unless
    stopped (to its first non-finite epoch): the epochs it charges, the value the trial is
    recorded with (inf: pruned, or nothing finite), and whether it is the study's first trial
    of quality (a new study best at `target` accuracy, run only to its best epoch). A trial
    it cannot judge (`judged` False: no complete peers yet) runs in full; any other loser
    costs one epoch."""
    finite = [v if math.isfinite(v) else math.inf for v in val[:ran]]
    at = min(range(len(finite)), key=finite.__getitem__) if finite else 0
    value = finite[at] if finite else math.inf
    if value < best and accuracy[at] >= target:
        return at + 1, value, True
    if not judged:
        return ran, value, False
    return 1, math.inf, False


def oracle(study: Study, target: float, startup: int, *, keep: int = 0) -> int:
    """Epochs a perfect-foresight pruner with `startup` unjudged trials spends to quality;
    with `keep`, it also runs the study's `keep` best curves in full (it kills none of them)."""
    pool = study.pool
    kept = set(np.argsort(pool.best)[:keep].tolist())
    ran = np.minimum(pool.first_bad, pool.val.shape[1])
    spent, best = 0, math.inf
    for i, (val, accuracy) in enumerate(zip(pool.val, study.accuracy, strict=True)):
        judged = i >= startup and i not in kept
        charged, value, won = perfect_verdict(
            val, accuracy, int(ran[i]), target=target, best=best, judged=judged
        )
        spent += charged
        if won:
            return spent
        best = min(best, value)
    return spent


def pruners(epochs: int) -> dict[str, tuple[Callable[[], Any], bool]]:
    """name -> (make, recorded at the last epoch)."""
    p = optuna.pruners
    return {
        REFERENCE: (p.MedianPruner, True),
        "default_pruner()": (default_pruner, False),
        "MedianPruner()": (p.MedianPruner, False),
        "MedianPruner(5, 5)": (
            lambda: p.MedianPruner(n_startup_trials=5, n_warmup_steps=5),
            False,
        ),
        "top-20%-after-1-epoch": (TopKAfterOneEpoch, False),
        "SuccessiveHalving/ASHA()": (p.SuccessiveHalvingPruner, False),
        f"HyperbandPruner(1, {epochs}, 3)": (lambda: p.HyperbandPruner(1, epochs, 3), False),
        "WilcoxonPruner(0.1, 5)": (
            lambda: p.WilcoxonPruner(p_threshold=0.1, n_startup_steps=5),
            False,
        ),
        "NopPruner": (p.NopPruner, False),
    }


def studies(folder: Path, epochs: int, draws: int) -> list[Study]:
    """`draws` random 30-curve studies of every pool (task x part) with 30 curves or more."""
    out = []
    for path in sorted(folder.glob("*.npz")):
        data = np.load(path)
        metrics = list(data["metrics"])
        params = json.loads(str(data["params"]))
        curves = data["curves"].astype(np.float64)[:, :, :epochs]
        for part in sorted(set(data["split"].tolist())):
            members = np.flatnonzero(data["split"] == part)
            if len(members) < TRIALS:
                continue
            for draw in range(draws):
                chosen = np.random.default_rng(1000 + draw).permutation(members)[:TRIALS]
                pick = curves[chosen]
                name, classes = f"{path.stem}/{part}", int(data["classes"])
                pool = replayed.Pool.of(name, classes, pick, metrics, [params[i] for i in chosen])
                out.append(Study(pool, pick[:, metrics.index("val_accuracy")]))
    return out


def run(chosen: list[Study], epochs: int) -> dict[str, dict[str, float]]:
    rows: dict[str, list[dict[str, float]]] = {}
    makers = pruners(epochs)
    for study in chosen:
        traces = {name: trace(study, make, last=last) for name, (make, last) in makers.items()}
        base = traces[REFERENCE]
        for name, got in traces.items():
            target = max(base.final, got.final) - TOLERANCE
            rows.setdefault(name, []).append(
                {
                    "ratio": to_quality(got.epochs, got.quality, target)
                    / to_quality(base.epochs, base.quality, target),
                    "epochs": sum(got.epochs) / sum(base.epochs),
                    "top5": got.top5,
                    "final": got.final - base.final,
                }
            )
        default = traces["default_pruner()"]
        target = max(base.final, default.final) - TOLERANCE
        spent = to_quality(base.epochs, base.quality, target)
        for startup in STARTUPS:
            rows.setdefault(f"oracle ({startup} unjudged)", []).append(
                {"ratio": oracle(study, target, startup) / spent}
            )
        for startup in STARTUPS:
            rows.setdefault(f"oracle ({startup} unjudged, kills no top-5)", []).append(
                {"ratio": oracle(study, target, startup, keep=TOP) / spent}
            )
    out = {}
    for name, got in rows.items():
        ratios = np.array([r["ratio"] for r in got])
        out[name] = {
            "to_quality": float(np.exp(np.log(ratios).mean())),
            "half_or_less": float((ratios <= 0.5).mean()),
            **{
                key: float(np.mean([r[key] for r in got]))
                for key in ("epochs", "top5", "final")
                if key in got[0]
            },
        }
    return out


def table(title: str, results: dict[str, dict[str, float]]) -> Table:
    out = Table(title=title, box=box.MARKDOWN)
    for column in ("pruner", "to quality", "<= 0.5x", "epochs", "top-5 killed", "final"):
        out.add_column(column, justify="left" if column == "pruner" else "right")
    for name, r in results.items():
        out.add_row(
            name,
            f"{r['to_quality']:.2f}x",
            f"{r['half_or_less']:.0%}",
            f"{r['epochs']:.2f}x" if "epochs" in r else "-",
            f"{r['top5']:.2f}" if "top5" in r else "-",
            f"{r['final']:+.4f}" if "final" in r else "-",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--curves", type=Path, default=HERE / "curves", help="folder of make_curves.py files"
    )
    parser.add_argument("--studies", type=int, default=3, help="random studies per pool")
    parser.add_argument("--epochs", type=int, default=15, help="the first N epochs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not 1 <= args.epochs <= replayed.TRAINED:
        parser.error(f"--epochs must be in [1, {replayed.TRAINED}], but got {args.epochs}")
    if args.studies < 1:
        parser.error(f"--studies must be >= 1, but got {args.studies}")
    replayed.EPOCHS = args.epochs
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*WilcoxonPruner will not prune")
    chosen = studies(args.curves, args.epochs, args.studies)
    if not chosen:
        parser.error(f"--curves {args.curves}: no pool of {TRIALS} or more curves (*.npz)")
    results = run(chosen, args.epochs)
    title = (
        f"time to quality: {len(chosen)} studies of {TRIALS} recorded curves x {args.epochs}"
        " epochs"
    )
    Console(width=160).print(table(title, results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
