"""Generate the real learning curves the pruning benchmarks replay.

Trains small MLPs with `search.trainable.train` (the built-in trainer) for 40 epochs on four
scikit-learn tasks, with a random learning rate, batch size, depth, width, optimizer,
normalization, schedule, weight decay and dropout per curve, wide enough that a good share of
runs diverge, rebound or stall. Everything is seeded: the same command writes the same file.

A curve whose trainer stopped on a non-finite value is padded with NaN up to 40 epochs (its
weights are lost: a trainer that kept going would report NaN). One curve in three of every
task is held out of tuning (`split == 1`); the `synthetic` task is held out whole.

Data note: `trainable.load_dataset` standardizes with `std + 1e-6`, which turns a digits pixel
that is constant in the training split into a 1e6-sized validation input (val loss in the
thousands). Until that is fixed there, this script trains on the same splits standardized with
a unit scale for constant features (what scikit-learn's StandardScaler does).

    nice python benchmarks/pruning/make_curves.py   # ~15 min on one core
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
#: task -> (curves, batch sizes, widest layer)
TASKS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "wine": (210, (8, 16, 32, 64), 256),
    "breast_cancer": (210, (16, 32, 64, 128), 256),
    "digits": (210, (32, 64, 128, 256), 128),
    "synthetic": (150, (32, 64, 128, 256), 128),
}
HELD_OUT_TASKS = ("synthetic",)


def load(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name == "synthetic":
        x, y = datasets.make_classification(
            n_samples=1500,
            n_features=20,
            n_informative=10,
            n_classes=4,
            flip_y=0.05,
            class_sep=0.8,
            random_state=0,
        )
    else:
        loader = {
            "digits": datasets.load_digits,
            "wine": datasets.load_wine,
            "breast_cancer": datasets.load_breast_cancer,
        }[name]
        x, y = loader(return_X_y=True)
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
        "width": int(round(math.exp(rng.uniform(math.log(8), math.log(widest))))),
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


def run_curve(task: str, params: dict, seed: int) -> np.ndarray:
    rows: list[dict[str, float]] = []
    trainable.train(
        params, "cpu", lambda _step, m: rows.append(m), dataset=task, epochs=EPOCHS, seed=seed
    )
    curve = np.full((len(METRICS), EPOCHS), np.nan, dtype=np.float32)
    for i, row in enumerate(rows):
        curve[:, i] = [row[m] for m in METRICS]
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "curves.npz")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of curves (tests)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainable.load_dataset = load  # type: ignore[assignment]  # see "Data note" above
    curves, tasks, splits, params_all = [], [], [], []
    began = time.perf_counter()
    for task_id, (task, (count, batch_sizes, widest)) in enumerate(TASKS.items()):
        rng = np.random.default_rng(1000 + task_id)
        for i in range(max(3, int(count * args.scale))):
            params = sample_params(rng, batch_sizes, widest)
            held_out = task in HELD_OUT_TASKS or rng.random() < 1 / 3
            curves.append(run_curve(task, params, seed=i))
            tasks.append(task_id)
            splits.append(int(held_out))
            params_all.append(params)
            if i % 25 == 0:
                print(f"{task} {i}/{count} {time.perf_counter() - began:.0f}s", flush=True)
    np.savez_compressed(
        args.out,
        curves=np.stack(curves),
        task=np.array(tasks, dtype=np.int8),
        split=np.array(splits, dtype=np.int8),
        tasks=np.array(list(TASKS)),
        metrics=np.array(METRICS),
        params=np.array(json.dumps(params_all)),
    )
    print(f"wrote {len(curves)} curves to {args.out} in {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
