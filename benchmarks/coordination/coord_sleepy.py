"""The objective both systems run in `benchmarks/coordination/bench.py`: a stand-in GPU job.

Each epoch "holds the GPU" for `COORD_EPOCH_SECONDS` (default 0.05) by sleeping, then calls
`report(epoch, {"val_loss": ...})` once: for `search` that is the worker's Reporter (report,
prune decision, bookkeeping), for plain Optuna a `trial.report` + `trial.should_prune`. So a
worker that is not sleeping is spending its time on coordination.

When `COORD_LEDGER` names a folder, each process appends to `<folder>/<pid>.log`:
`S <t>` when a trial starts (the objective is entered), `E <t> <wall> <cpu>` after each
report call (its wall time and main-thread CPU time, seconds), `F <t>` when the trial's
training ends (normally or pruned). The benchmark reads epochs per minute, the per-epoch call
and the gap between trials (`F` to the next `S`) from there; the database is not involved.
"""

from __future__ import annotations

import os
import time
from typing import Any

EPOCH_SECONDS = float(os.environ.get("COORD_EPOCH_SECONDS", "0.05"))
LEDGER = os.environ.get("COORD_LEDGER")


class _Ledger:
    def __init__(self) -> None:
        self.file = open(f"{LEDGER}/{os.getpid()}.log", "a") if LEDGER else None  # noqa: SIM115

    def write(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line)
            self.file.flush()


_ledger: _Ledger | None = None


def _get_ledger() -> _Ledger:
    global _ledger
    if _ledger is None:
        _ledger = _Ledger()
    return _ledger


def sleepy(params: dict[str, Any], device: str, report: Any, epochs: int = 20) -> float:
    """Sleep per epoch; the loss falls towards (x - 0.3)^2, so TPE and the pruners have work."""
    ledger = _get_ledger()
    ledger.write(f"S {time.time():.4f}\n")
    target = (float(params["x"]) - 0.3) ** 2
    loss = target + 1.0
    try:
        for epoch in range(1, epochs + 1):
            time.sleep(EPOCH_SECONDS)
            loss = target + 1.0 / epoch
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                report(epoch, {"val_loss": loss})
            finally:
                ledger.write(
                    f"E {time.time():.4f} {time.perf_counter() - wall:.6f} "
                    f"{time.thread_time() - cpu:.6f}\n"
                )
    finally:
        ledger.write(f"F {time.time():.4f}\n")
    return loss
