"""Bring your own training code: a user objective with the same contract as the built-in one.

`train(params, device, report, checkpoint=None, epochs=...)` gets the sampled params, the device
(`cpu` or `cuda:N`) and a `report(epoch, metrics)` callable. It knows nothing of Optuna: report
the study's metric each epoch and let `report` raise to stop (pruning, early stopping,
preemption). Here, plain gradient descent on a noisy quadratic bowl, whose loss curve diverges
when the learning rate is too large and stalls when it is too small.
"""

from __future__ import annotations

import math
import random
from typing import Any


def train(
    params: dict[str, Any], device: str, report: Any, checkpoint: Any = None, epochs: int = 20
) -> float:
    lr, curvature = float(params["lr"]), float(params["curvature"])
    rng = random.Random(0)
    x, start = 5.0, 0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        x, start = state["x"], state["epoch"]
    for epoch in range(start, epochs):
        for _ in range(10):
            x -= lr * (curvature * x + rng.gauss(0, 0.1))
            if not math.isfinite(x) or abs(x) > 1e150:
                x = math.inf
                break
        loss = 0.5 * curvature * x * x if math.isfinite(x) else math.inf
        if checkpoint is not None and math.isfinite(loss):
            checkpoint.save({"x": x, "epoch": epoch + 1})
        report(epoch + 1, {"val_loss": loss, "x": x})
        if not math.isfinite(loss):
            break
    return 0.5 * curvature * x * x
