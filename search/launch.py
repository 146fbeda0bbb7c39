"""Dispatch: start one worker process per GPU (or CPU workers), watch them, show progress.

`search launch` on several machines against one PostgreSQL URL forms one study: each launcher
only starts local workers and reads progress from the database. Children get the storage URL
through `SEARCH_STORAGE` (never on the command line, where `ps` would show a password) and
their GPU through `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.trial import TrialState

from search import optuna_compat, record
from search.budget import BudgetState, budget_state
from search.record import Outcome
from search.retry import fail_and_requeue
from search.storage import STORAGE_ENV
from search.watchdog import EXIT_RECYCLE, RECYCLE_ENV

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3


@dataclass(frozen=True)
class WorkerPlan:
    """One worker to start: its index, device argument and extra environment."""

    index: int
    device: str
    env: dict[str, str] = field(default_factory=dict)


def visible_gpus() -> list[str]:
    """GPU ids this machine may use: `CUDA_VISIBLE_DEVICES` if set, else what nvidia-smi lists."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [g.strip() for g in declared.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def plan_workers(
    *,
    workers: int | None,
    gpus: Sequence[str],
    workers_per_gpu: int = 1,
    cpu_count: int | None = None,
) -> list[WorkerPlan]:
    """Which workers to start: `workers_per_gpu` per GPU, else CPU workers sharing the cores.

    Each GPU worker sees exactly one GPU (`CUDA_VISIBLE_DEVICES=<id>`, device `cuda:0`).
    `workers` caps the GPU workers, or sets the CPU worker count (default: half the cores).
    """
    if workers_per_gpu < 1:
        raise ValueError(f"workers_per_gpu must be >= 1, but got {workers_per_gpu=}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, but got {workers=}")
    cores = cpu_count or os.cpu_count() or 1
    if gpus:
        slots = [g for g in gpus for _ in range(workers_per_gpu)]
        if workers is not None:
            slots = slots[:workers]
        return [WorkerPlan(i, "cuda:0", {"CUDA_VISIBLE_DEVICES": g}) for i, g in enumerate(slots)]
    count = workers if workers is not None else max(1, cores // 2)
    threads = str(max(1, cores // count))
    return [
        WorkerPlan(i, "cpu", {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads})
        for i in range(count)
    ]


@dataclass
class _Child:
    plan: WorkerPlan
    worker_id: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    restarts: int = 0
    restart_at: float | None = None
    done: bool = False


class Launcher:
    """Start and supervise this machine's workers for one study."""

    def __init__(
        self,
        study: optuna.Study,
        storage_url: str,
        plans: list[WorkerPlan],
        *,
        log_dir: Path,
        checkpoint_dir: str | None = None,
        debug: bool = False,
    ) -> None:
        self.study = study
        self.storage_url = storage_url
        self.checkpoint_dir = checkpoint_dir
        self.debug = debug
        host = socket.gethostname()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children = [
            _Child(p, f"{host}-w{p.index}", log_dir / f"worker-{p.index}.log") for p in plans
        ]
        self._stopping = False

    def run(
        self, on_progress: Callable[[BudgetState], None] | None = None, poll: float = 0.5
    ) -> BudgetState:
        """Run until every worker has exited; returns the study's final budget state.

        Raises:
            KeyboardInterrupt: after SIGINT or SIGTERM, once every worker has stopped and its
                running trial was handed back.
        """
        signals: list[int] = []

        def on_signal(signum: int, _: Any) -> None:
            # Only note it: a handler that raised could strike inside a database call. Set
            # explicitly, since a launcher started in the background inherits SIGINT ignored.
            if not signals:
                signals.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                self._start(child)
            while not signals and not all(c.done for c in self.children):
                self._supervise()
                if on_progress is not None:
                    on_progress(budget_state(self.study))
                time.sleep(poll)
            if signals:
                self.stop()
                raise KeyboardInterrupt
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return budget_state(self.study)

    def stop(self, timeout: float = 60.0) -> None:
        """Ask every worker to stop at its next epoch; kill and hand back what is left."""
        self._stopping = True
        alive = [c for c in self.children if c.process and c.process.poll() is None]
        for child in alive:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in alive:
            assert child.process is not None
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        for child in self.children:
            child.done = True
            if child.log:
                child.log.close()
        self._hand_back_orphans()

    def _start(self, child: _Child) -> None:
        env = {
            **os.environ,
            **child.plan.env,
            STORAGE_ENV: self.storage_url,
            RECYCLE_ENV: "1",
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, "-m", "search"]
        if self.debug:
            command.append("--debug")
        command += [
            "worker",
            self.study.study_name,
            "--device",
            child.plan.device,
            "--worker-id",
            child.worker_id,
        ]
        if self.checkpoint_dir:
            command += ["--checkpoint-dir", self.checkpoint_dir]
        child.log = child.log_path.open("ab")
        child.process = subprocess.Popen(
            command, env=env, stdout=child.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        child.restart_at = None
        logger.info(
            "Started worker %s (pid %d) on %s; log %s.",
            child.worker_id,
            child.process.pid,
            child.plan.device,
            child.log_path,
        )

    def _supervise(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.done or child.process is None:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            code = child.process.poll()
            if code is None:
                continue
            if child.log:
                child.log.close()
            if code == 0 or self._stopping or budget_state(self.study).done:
                child.done = True
            elif code == EXIT_RECYCLE:  # it asked for a fresh process: not a crash
                logger.info("Worker %s recycled; starting a fresh process.", child.worker_id)
                self._start(child)
            elif code == 2 or child.restarts >= MAX_RESTARTS:
                child.done = True
                logger.error(
                    "Worker %s exited with code %d; not restarting it (see %s).",
                    child.worker_id,
                    code,
                    child.log_path,
                )
            else:
                child.restarts += 1
                delay = 2.0**child.restarts
                child.restart_at = now + delay
                logger.warning(
                    "Worker %s crashed (exit %d); restart %d/%d in %.0f s.",
                    child.worker_id,
                    code,
                    child.restarts,
                    MAX_RESTARTS,
                    delay,
                )

    def _hand_back_orphans(self) -> None:
        """Trials left RUNNING by workers that had to be killed are failed and requeued."""
        ours = {c.worker_id for c in self.children}
        storage = optuna_compat.storage_of(self.study)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get(record.WORKER) not in ours:
                continue
            fail_and_requeue(
                storage,
                optuna_compat.study_id(self.study),
                optuna_compat.trial_id(trial),
                Outcome.INTERRUPTED,
                max_retries=None,
            )
