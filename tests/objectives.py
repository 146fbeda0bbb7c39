"""User objectives for the worker tests (importable as `objectives:<name>` in subprocesses).

They follow the user-objective contract `(params, device, report, checkpoint=None, epochs=N)`.
"""

from __future__ import annotations

import os
import time
from typing import Any

EPOCH_SECONDS = float(os.environ.get("SEARCH_TEST_EPOCH_SECONDS", "0.3"))


def sleepy(params: dict[str, Any], device: str, report: Any, checkpoint: Any = None,
           epochs: int = 5) -> None:
    """Sleeps per epoch like a GPU job; the loss falls towards (x - 0.3)^2. Checkpoints."""
    start = 0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        start = int(state["epoch"])
    target = (float(params["x"]) - 0.3) ** 2
    for epoch in range(start, epochs):
        time.sleep(EPOCH_SECONDS)
        if checkpoint is not None:
            checkpoint.save({"epoch": epoch + 1, "pid": os.getpid()})
        report(epoch + 1, {"val_loss": target + 1.0 / (epoch + 1), "started_at_epoch": start})


def oom_when_big(params: dict[str, Any], device: str, report: Any, epochs: int = 2) -> None:
    """Simulates a CUDA out-of-memory error for batch_size >= 64: no GPU exists here, so the
    test raises the real `torch.cuda.OutOfMemoryError` class as a CUDA allocator would."""
    import torch

    if params["batch_size"] >= 64 and params["width"] >= 64:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    for epoch in range(epochs):
        report(epoch + 1, {"val_loss": 1.0 / params["batch_size"] + params["width"] / 1e4})


def env_probe(params: dict[str, Any], device: str, report: Any, epochs: int = 1) -> None:
    """Reports which GPU the worker was given (CUDA_VISIBLE_DEVICES) and its device string,
    so dispatch can be checked on a machine without GPUs (nothing touches CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    for epoch in range(epochs):
        time.sleep(EPOCH_SECONDS)
        report(epoch + 1, {"val_loss": float(params["x"]) ** 2,
                           "gpu": float(visible) if visible else -1.0,
                           "cuda0": float(device == "cuda:0")})


def oom_unless_accumulated(params: dict[str, Any], device: str, report: Any,
                           accumulation_steps: int = 1, epochs: int = 2) -> None:
    """Like `oom_when_big`, but only micro-batches of 128+ run out of memory, so gradient
    accumulation (batch_size / accumulation_steps) makes the config fit."""
    import torch

    if params["batch_size"] / accumulation_steps >= 128:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    for epoch in range(epochs):
        report(epoch + 1, {"val_loss": 1.0 / (epoch + 1), "accumulation": accumulation_steps})


def broken(params: dict[str, Any], device: str, report: Any) -> None:
    """A user objective with a bug."""
    raise KeyError("learning_rate")


_TRIALS_IN_THIS_PROCESS = [0]


def dies_after_one_trial(params: dict[str, Any], device: str, report: Any,
                         epochs: int = 1) -> None:
    """Like `sleepy` for one trial per process; the process then exits with
    `SEARCH_TEST_EXIT_CODE` at the start of its next trial (a crash, or 75: "recycle me")."""
    _TRIALS_IN_THIS_PROCESS[0] += 1
    if _TRIALS_IN_THIS_PROCESS[0] > 1:
        os._exit(int(os.environ["SEARCH_TEST_EXIT_CODE"]))
    for epoch in range(epochs):
        time.sleep(EPOCH_SECONDS)
        report(epoch + 1, {"val_loss": (float(params["x"]) - 0.3) ** 2 + 1.0 / (epoch + 1)})


def returns_nan(params: dict[str, Any], device: str, report: Any) -> float:
    """Never reports; returns NaN (a broken objective)."""
    return float("nan")


def returns_none(params: dict[str, Any], device: str, report: Any) -> None:
    """Never reports and returns nothing (a broken objective)."""


def returns_tensor(params: dict[str, Any], device: str, report: Any) -> Any:
    """Never reports; returns its loss as a 0-d torch tensor (`return loss`), which is fine."""
    import torch

    return torch.tensor((float(params["x"]) - 0.3) ** 2)


def returns_vector(params: dict[str, Any], device: str, report: Any) -> Any:
    """Never reports; returns a tensor of shape (3,): unusable."""
    import torch

    return torch.zeros(3)


def reports_nan(params: dict[str, Any], device: str, report: Any, epochs: int = 3) -> None:
    """Reports a NaN loss every epoch: every trial diverges, the study gets no result."""
    for epoch in range(epochs):
        report(epoch + 1, {"val_loss": float("nan")})


def wrong_metric(params: dict[str, Any], device: str, report: Any) -> None:
    """Reports `loss` for a study whose metric is `val_loss`."""
    report(1, {"loss": 1.0})


def hangs(params: dict[str, Any], device: str, report: Any, epochs: int = 3) -> None:
    """Reports one epoch, then hangs (a deadlocked data loader)."""
    report(1, {"val_loss": 1.0})
    time.sleep(3600)


def boom(params: dict[str, Any], device: str, report: Any) -> None:
    """Raises after one epoch."""
    report(1, {"val_loss": 1.0})
    raise RuntimeError("boom")


def saves_big(params: dict[str, Any], device: str, report: Any, checkpoint: Any = None,
              epochs: int = 2) -> None:
    """Checkpoints 4 MB of weights each epoch (fills a small checkpoint folder)."""
    import torch

    for epoch in range(epochs):
        if checkpoint is not None:
            checkpoint.save({"epoch": epoch + 1, "w": torch.zeros(1_000_000)})
        report(epoch + 1, {"val_loss": float(params["x"]) ** 2 + 1.0 / (epoch + 1)})


def exit_once(params: dict[str, Any], device: str, report: Any, epochs: int = 3) -> None:
    """Like `env_probe`, but the first trial to reach epoch 2 kills its own process (a crash:
    no hand-back, no exception), once per directory named by SEARCH_TEST_CRASH_DIR."""
    marker = os.path.join(os.environ["SEARCH_TEST_CRASH_DIR"], "crashed")
    for epoch in range(epochs):
        time.sleep(EPOCH_SECONDS)
        if epoch == 1:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        report(epoch + 1, {"val_loss": float(params["x"]) ** 2})


def held(params: dict[str, Any], device: str, report: Any, epochs: int = 1) -> None:
    """Like `env_probe`, but waits before its first epoch while the file named by
    SEARCH_TEST_HOLD_FILE exists, so a test can keep trials running until it lets them go."""
    hold = os.environ["SEARCH_TEST_HOLD_FILE"]
    while os.path.exists(hold):
        time.sleep(0.1)
    env_probe(params, device, report, epochs=epochs)
