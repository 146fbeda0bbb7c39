"""The built-in PyTorch trainer: an MLP on a scikit-learn dataset. It knows nothing of Optuna.

`train(params, device, report, ...)` trains for `epochs` epochs and calls
`report(epoch, metrics)` after each one with `val_loss`, `val_accuracy`, `train_loss`, `lr`,
`grad_norm` (the largest gradient norm of the epoch) and `epoch_seconds`. `report` may raise a
`search.exceptions.StopTrial` to end training; this module lets it propagate.

Tuning knowledge built in: learning-rate warm-up then constant, step decay or cosine annealing;
an optional checkpoint to resume from; gradient accumulation that keeps the effective batch.
A non-finite loss is reported as it is (never raised) and ends training, since the weights are
lost.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

Report = Callable[[int, dict[str, float]], None]


class CheckpointStore(Protocol):
    """Where a trial keeps its last epoch's state (see `search.checkpoint.Checkpoint`)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


@functools.lru_cache(maxsize=4)
def load_dataset(
    name: str, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(x_train, y_train, x_val, y_val)`: standardized on train statistics, fixed 80/20 split."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    loaders = {
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
    }
    if name not in loaders:
        raise ValueError(f"dataset must be one of {sorted(loaders)}, but got {name=}")
    x, y = loaders[name](return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.2, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)  # a feature constant in the training split stays 0
    return (x_train - mean) / std, y_train, (x_val - mean) / std, y_val


def build_mlp(
    n_in: int, n_out: int, *, depth: int, width: int, dropout: float = 0.0, norm: str = "none"
) -> nn.Sequential:
    """`depth` hidden layers of `width` units with ReLU (optionally batch/layer norm, dropout)."""
    layers: list[nn.Module] = []
    size = n_in
    for _ in range(depth):
        layers.append(nn.Linear(size, width))
        if norm == "batch":
            layers.append(nn.BatchNorm1d(width))
        elif norm == "layer":
            layers.append(nn.LayerNorm(width))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        size = width
    layers.append(nn.Linear(size, n_out))
    return nn.Sequential(*layers)


def lr_at(
    epoch: int,
    *,
    base_lr: float,
    epochs: int,
    schedule: str = "constant",
    warmup_epochs: int = 0,
    step_gamma: float = 0.5,
) -> float:
    """The learning rate for 0-based `epoch`: linear warm-up, then the schedule."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / (warmup_epochs + 1)
    t = epoch - warmup_epochs
    span = max(1, epochs - warmup_epochs)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * t / span))
    if schedule == "step":
        return base_lr * step_gamma ** (t // max(1, span // 3))
    if schedule == "constant":
        return base_lr
    raise ValueError(f"schedule must be constant, step or cosine, but got {schedule=}")


def make_optimizer(
    name: str, parameters: Any, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be adam, adamw, sgd or rmsprop, but got {name=}")


def train(
    params: dict[str, Any],
    device: str,
    report: Report,
    *,
    dataset: str = "digits",
    epochs: int = 20,
    seed: int = 0,
    checkpoint: CheckpointStore | None = None,
    accumulation_steps: int = 1,
) -> float:
    """Train an MLP with `params` on `device`, reporting after every epoch.

    Args:
        params: `lr`, `batch_size`, `depth`, `width`; optional `optimizer` (adam), `weight_decay`
            (0), `momentum` (0.9, SGD), `schedule` (constant|step|cosine), `warmup_epochs` (0),
            `step_gamma` (0.5), `dropout` (0), `norm` (none|batch|layer).
        device: `cpu` or `cuda:N`.
        report: called as `report(epoch, metrics)` after each 1-based epoch.
        checkpoint: where to save each epoch and resume from if it holds a state.
        accumulation_steps: split each batch into this many micro-batches (same effective batch).

    Returns:
        The best validation loss seen (NaN if every epoch was non-finite).
    """
    torch.manual_seed(seed)
    x_train, y_train, x_val, y_val = (
        torch.from_numpy(a).to(device) for a in load_dataset(dataset)
    )
    n_classes = int(y_train.max().item()) + 1
    model = build_mlp(
        x_train.shape[1],
        n_classes,
        depth=int(params["depth"]),
        width=int(params["width"]),
        dropout=float(params.get("dropout", 0.0)),
        norm=str(params.get("norm", "none")),
    ).to(device)
    base_lr = float(params["lr"])
    optimizer = make_optimizer(
        str(params.get("optimizer", "adam")),
        model.parameters(),
        lr=base_lr,
        weight_decay=float(params.get("weight_decay", 0.0)),
        momentum=float(params.get("momentum", 0.9)),
    )
    generator = torch.Generator().manual_seed(seed)
    start, best = 0, math.inf
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, best = int(state["epoch"]), float(state["best"])
    batch_size = int(params["batch_size"])
    micro = max(1, math.ceil(batch_size / max(1, accumulation_steps)))
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(start, epochs):
        began = time.perf_counter()
        lr = lr_at(
            epoch,
            base_lr=base_lr,
            epochs=epochs,
            schedule=str(params.get("schedule", "constant")),
            warmup_epochs=int(params.get("warmup_epochs", 0)),
            step_gamma=float(params.get("step_gamma", 0.5)),
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        total, seen, grad_norm = 0.0, 0, 0.0
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            optimizer.zero_grad(set_to_none=True)
            for part in batch.split(micro):
                loss = loss_fn(model(x_train[part]), y_train[part])
                (loss * len(part) / len(batch)).backward()
                total += loss.item() * len(part)
                seen += len(part)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item()
            grad_norm = norm if not math.isfinite(norm) else max(grad_norm, norm)
            if not math.isfinite(total) or not math.isfinite(norm):
                break
            optimizer.step()
        val_loss, val_accuracy = _evaluate(model, x_val, y_val, loss_fn)
        if math.isfinite(val_loss):
            best = min(best, val_loss)
        if checkpoint is not None and math.isfinite(val_loss):
            checkpoint.save(
                {
                    "epoch": epoch + 1,
                    "best": best,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                }
            )
        report(
            epoch + 1,
            {
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "train_loss": total / max(1, seen),
                "lr": lr,
                "grad_norm": grad_norm,
                "epoch_seconds": time.perf_counter() - began,
            },
        )
        if not all(math.isfinite(v) for v in (val_loss, total, grad_norm)):
            break
    return best if math.isfinite(best) else math.nan


@torch.no_grad()
def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module
) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = float(loss_fn(logits, y).item())
    accuracy = float((logits.argmax(dim=1) == y).float().mean().item())
    return loss, accuracy
