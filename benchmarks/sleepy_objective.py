"""A sleep-based user objective for `benchmarks/crash_recovery.py`: a stand-in GPU job.

Each epoch "holds the GPU" for `CRASH_BENCH_EPOCH_SECONDS` (default 0.5) by sleeping, so a
benchmark with 16 workers on a 2-core machine is limited by neither CPU nor a real device. It
follows the user-objective contract `train(params, device, report, checkpoint=None, epochs=N)`:
it resumes from `checkpoint.load()`, saves `{"epoch": ...}` after every epoch, and reports
`val_loss`, the simulated GPU-seconds of the epoch (`gpu_seconds`) and the epoch it started
from (`started_at_epoch`).

It imports torch when called, as real training code does (`search.checkpoint` does too, on
the first `load`), so that runs with and without checkpoints pay the same start-up per worker.

When `CRASH_BENCH_LEDGER` names a folder, the start time of every epoch is appended to
`<folder>/<pid>.log` before the epoch runs; after a `kill -9` the benchmark reads there how
much of the epoch in flight was thrown away (the database only sees finished epochs).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

EPOCH_SECONDS = float(os.environ.get("CRASH_BENCH_EPOCH_SECONDS", "0.5"))
LEDGER = os.environ.get("CRASH_BENCH_LEDGER")


def train(
    params: dict[str, Any], device: str, report: Any, checkpoint: Any = None, epochs: int = 8
) -> float:
    import torch  # noqa: F401  (the start-up cost of real training code)

    state = checkpoint.load() if checkpoint is not None else None
    start = int(state["epoch"]) if state else 0
    target = (float(params["x"]) - 0.3) ** 2
    loss = target + 1.0
    for epoch in range(start, epochs):
        _log_epoch_start(epoch + 1)
        time.sleep(EPOCH_SECONDS)
        loss = target + 1.0 / (epoch + 1)
        if checkpoint is not None:
            checkpoint.save({"epoch": epoch + 1})
        report(
            epoch + 1,
            {"val_loss": loss, "gpu_seconds": EPOCH_SECONDS, "started_at_epoch": start},
        )
    return loss


def _log_epoch_start(epoch: int) -> None:
    if not LEDGER:
        return
    with (Path(LEDGER) / f"{os.getpid()}.log").open("a") as ledger:
        ledger.write(f"{time.time():.3f} {epoch}\n")
