"""Generate the real learning curves the pruning benchmarks replay.

Trains small MLPs with `search.trainable.train` (the built-in trainer) for 40 epochs on four
scikit-learn tasks, with a random learning rate, batch size, depth, width, optimizer,
normalization, schedule, weight decay and dropout per curve, wide enough that a good share of
runs diverge, rebound or stall. Everything is seeded: the same command writes the same files,
one `curves/<task>.npz` per task, each reproducible alone with `--tasks`.

A curve whose trainer stopped on a non-finite value is padded with NaN up to 40 epochs (its
weights are lost: a trainer that kept going would report NaN). Parts (`split`): 0 tunes the
pruner; 1 is held out (one curve in three of every task, and `synthetic4` whole); 2 is a
fresh held-out set (`*-b` tasks: new draws on the same four datasets), generated after the
pruner's defaults were frozen; 3 (`*-c` tasks, issue 11) is a second fresh set, generated
after issue 11's defaults were first frozen; 4 (`*-d`) is a third, looked at only after the
final defaults were chosen (see RESULTS.md, "History"); 5 (`*-e`) a fourth, generated at the
start of the second issue-11 session and looked at after its first freeze; 6 (`*-f`) a fifth,
generated after its second freeze and looked at before its last change; 7 (`*-g`) a sixth,
generated after the third freeze and looked at before `overfit_patience` went back to 3; 8
(`*-h`) a seventh, generated after that last change; 9 (`*-i`) an eighth, generated in the
third session after the comparison's budget-relative warm-up was frozen (looked at before
the last-step and overfitting changes); 10 (`*-j`) a ninth, generated after those
(looked at, metric-only, before the study-relative fall of a loss); 11 (`*-k`) a tenth,
generated after that; 12 (`*-l`) an eleventh, generated in the fourth session after its
first freeze (looked at before the last-fifth change); 13 (`*-m`) a twelfth, generated after
that.

Why not wine: its validation split has 36 samples, and 50 of 210 wine runs (exploded ones
among them) reach val_loss < 0.001, so "the 5 best curves" is a tie among dozens.

Data note: `trainable.load_dataset` standardizes with `std + 1e-6`, which turns a digits pixel
that is constant in the training split into a 1e6-sized validation input (val loss in the
thousands). Until that is fixed there, this script trains on the same splits standardized with
a unit scale for constant features (what scikit-learn's StandardScaler does).

    nice python benchmarks/pruning/make_curves.py   # ~25 min on one core
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search import trainable

HERE = Path(__file__).resolve().parent
EPOCHS = 40
METRICS = ("val_loss", "train_loss", "grad_norm", "val_accuracy")
#: dataset -> (seed offset, batch sizes, widest layer)
DATASETS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "breast_cancer": (1, (16, 32, 64, 128), 256),
    "digits": (2, (32, 64, 128, 256), 128),
    "synthetic6": (4, (32, 64, 128, 256), 128),
    "synthetic4": (3, (32, 64, 128, 256), 128),
}
#: the fresh held-out sets (the docstring says when each was made): suffix -> (part, curves
#: per dataset); a set's sampling seed is part x 1000 + the dataset's offset
FRESH = {"b": (2, 70), "c": (3, 50), **{s: (part, 30) for part, s in enumerate("defghijklm", 4)}}
#: task (dataset[-suffix]) -> (sampling seed, curves, batch sizes, widest layer)
TASKS: dict[str, tuple[int, int, tuple[int, ...], int]] = {
    name: (1000 + offset, 150 if name == "synthetic4" else 210, sizes, widest)
    for name, (offset, sizes, widest) in DATASETS.items()
}
TASKS |= {
    f"{name}-{suffix}": (part * 1000 + offset, count, sizes, widest)
    for suffix, (part, count) in FRESH.items()
    for name, (offset, sizes, widest) in DATASETS.items()
}
#: tasks whose curves all go to one part (the others: one in three to part 1)
FIXED_PART = {"synthetic4": 1}
FIXED_PART |= {f"{name}-{s}": part for s, (part, _) in FRESH.items() for name in DATASETS}
CLASSES = {"breast_cancer": 2, "digits": 10, "synthetic6": 6, "synthetic4": 4}


def load(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name == "synthetic4":
        x, y = datasets.make_classification(
            n_samples=1500,
            n_features=20,
            n_informative=10,
            n_classes=4,
            flip_y=0.05,
            class_sep=0.8,
            random_state=0,
        )
    elif name == "synthetic6":
        x, y = datasets.make_classification(
            n_samples=2000,
            n_features=30,
            n_informative=12,
            n_redundant=6,
            n_classes=6,
            flip_y=0.02,
            class_sep=1.2,
            random_state=1,
        )
    else:
        loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}
        x, y = loader[name](return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.2, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    return (x_train - mean) / std, y_train, (x_val - mean) / std, y_val


def sample_params(rng: np.random.Generator, batch_sizes: tuple[int, ...], widest: int) -> dict:
    optimizer = str(rng.choice(["adam", "adamw", "sgd", "rmsprop"], p=[0.3, 0.2, 0.3, 0.2]))
    low, high = (1e-4, 10.0) if optimizer == "sgd" else (1e-5, 1.0)
    params: dict[str, Any] = {
        "lr": float(math.exp(rng.uniform(math.log(low), math.log(high)))),
        "batch_size": int(rng.choice(batch_sizes)),
        "depth": int(rng.integers(1, 5)),
        "width": round(math.exp(rng.uniform(math.log(8), math.log(widest)))),
        "optimizer": optimizer,
        "norm": str(rng.choice(["none", "batch", "layer"], p=[0.5, 0.25, 0.25])),
        "schedule": str(rng.choice(["constant", "cosine", "step"], p=[0.6, 0.25, 0.15])),
        "warmup_epochs": int(rng.choice([0, 0, 0, 1, 2, 3, 5])),
        "weight_decay": 0.0,
        "dropout": 0.0,
    }
    if rng.random() < 0.3:
        params["weight_decay"] = float(math.exp(rng.uniform(math.log(1e-5), math.log(1e-2))))
    if rng.random() < 0.4:
        params["dropout"] = float(rng.uniform(0.1, 0.5))
    if optimizer == "sgd":
        params["momentum"] = float(rng.choice([0.0, 0.9, 0.9, 0.95]))
    return params


def run_curve(dataset: str, params: dict, seed: int) -> np.ndarray:
    rows: list[dict[str, float]] = []
    trainable.train(
        params, "cpu", lambda _step, m: rows.append(m), dataset=dataset, epochs=EPOCHS, seed=seed
    )
    curve = np.full((len(METRICS), EPOCHS), np.nan, dtype=np.float32)
    for i, row in enumerate(rows):
        curve[:, i] = [row[m] for m in METRICS]
    return curve


def make_task(task: str, out: Path, scale: float = 1.0) -> None:
    seed, count, batch_sizes, widest = TASKS[task]
    dataset = task.split("-")[0]
    rng = np.random.default_rng(seed)
    curves, splits, params_all = [], [], []
    began = time.perf_counter()
    for i in range(max(3, int(count * scale))):
        params = sample_params(rng, batch_sizes, widest)
        part = FIXED_PART[task] if task in FIXED_PART else int(rng.random() < 1 / 3)
        curves.append(run_curve(dataset, params, seed=i))
        splits.append(part)
        params_all.append(params)
        if i % 25 == 0:
            print(f"{task} {i}/{count} {time.perf_counter() - began:.0f}s", flush=True)
    np.savez_compressed(
        out / f"{task}.npz",
        curves=np.stack(curves),
        split=np.array(splits, dtype=np.int8),
        classes=np.array(CLASSES[dataset]),
        metrics=np.array(METRICS),
        params=np.array(json.dumps(params_all)),
    )
    print(f"wrote {len(curves)} {task} curves in {time.perf_counter() - began:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "curves")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of curves (tests)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainable.load_dataset = load  # type: ignore[assignment]  # see "Data note" above
    args.out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks.split(","):
        make_task(task, args.out, args.scale)


if __name__ == "__main__":
    main()
