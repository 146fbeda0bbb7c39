"""Dispatch: start one worker process per GPU (or CPU workers), watch them, show progress.

`search launch` on several machines against one PostgreSQL URL forms one study: each launcher
only starts local workers and reads progress from the database. Children get the storage URL
through `SEARCH_STORAGE` (never on the command line, where `ps` would show a password) and
their GPU through `CUDA_VISIBLE_DEVICES`.

Each launcher draws a random token at start; its workers are named
`<host>-<token>-w<slot>.<start>`, unique to this launcher and to each start of a slot, so two
launchers on one host never take each other's trials for their own (on stop, the launcher hands
back exactly the trials of the workers it had to kill) and write to their own logs
(`worker-<slot>-<token>.log`).

Supervision: a crashed worker is restarted with backoff, up to `MAX_RESTARTS` times in a row
(the count starts again once a worker has finished a trial or run `healthy_after` seconds); a
worker that exits with `EXIT_RECYCLE` asks to be replaced by a fresh process and is restarted
at once; one that exits 0 while the study is not done (a SIGTERM this launcher did not send) is
restarted and logged. On SIGINT/SIGTERM every worker is asked to stop at its next epoch
(`--stop-timeout`, `WORKER_STOP_TIMEOUT`) and killed `STOP_GRACE` seconds after that; a second
signal kills them at once. Either way their trials are handed back for a retry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import optuna
from optuna.trial import TrialState

from search import optuna_compat, record
from search.budget import BudgetState, budget_state
from search.exceptions import LaunchError
from search.record import Outcome
from search.retry import fail_and_requeue
from search.storage import STORAGE_ENV
from search.watchdog import EXIT_RECYCLE, RECYCLE_ENV, STOP_TIMEOUT

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3
#: Seconds a worker waits for an epoch boundary after SIGTERM before it hands its trial back.
WORKER_STOP_TIMEOUT = STOP_TIMEOUT
#: The launcher kills a worker this many seconds after the worker's own stop timeout.
STOP_GRACE = 10.0
#: A worker that has run this long counts as healthy: its crash count starts again.
HEALTHY_SECONDS = 300.0
_TRACEBACK_LAST = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def noting_signals(signals: list[int]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM are only appended to `signals` (a handler that raised
    could strike inside a database call); the earlier handlers come back on exit. Installed
    explicitly, since a launcher started in the background inherits SIGINT ignored. Off the
    main thread nothing is installed: the caller handles signals and calls `stop`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda n, _: signals.append(n)) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def check_gpus(requested: str, available: Sequence[str]) -> list[str]:
    """The GPU ids of `--gpus`, each of which this machine must have.

    Raises:
        LaunchError: an id is not among `available` (`visible_gpus()`).
    """
    ids = [g.strip() for g in requested.split(",") if g.strip()]
    missing = [g for g in ids if g not in available]
    if not ids or missing:
        listed = ", ".join(available) if available else "none"
        raise LaunchError(
            f"--gpus {requested}: this machine has no GPU {', '.join(missing or [requested])} "
            f"(GPUs visible here: {listed}; from CUDA_VISIBLE_DEVICES, else nvidia-smi)"
        )
    return ids


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
    log_path: Path
    worker_id: str = ""
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    starts: int = 0
    started_at: float = 0.0
    restarts: int = 0  # crashes in a row, reset once the worker is healthy
    restart_at: float | None = None
    done: bool = False
    last_exit: int | None = None
    worker_ids: list[str] = field(default_factory=list)


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
        stop_timeout: float = WORKER_STOP_TIMEOUT,
        healthy_after: float = HEALTHY_SECONDS,
    ) -> None:
        if stop_timeout <= 0:
            raise ValueError(f"stop_timeout must be > 0, but got {stop_timeout=}")
        self.study = study
        self.storage_url = storage_url
        self.checkpoint_dir = checkpoint_dir
        self.debug = debug
        self.stop_timeout = stop_timeout
        self.healthy_after = healthy_after
        self.token = secrets.token_hex(3)
        self.host = socket.gethostname()
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children = [_Child(p, log_dir / f"worker-{p.index}-{self.token}.log") for p in plans]
        self._stopping = False
        self._signals: list[int] = []

    def run(
        self, on_progress: Callable[[BudgetState], None] | None = None, poll: float = 0.5
    ) -> BudgetState:
        """Run until every worker has exited; returns the study's final budget state.

        Raises:
            KeyboardInterrupt: after SIGINT or SIGTERM, once every worker has stopped and its
                running trial was handed back.
        """
        with noting_signals(self._signals):
            for child in self.children:
                self._start(child)
            while not self._signals and not all(c.done for c in self.children):
                self._supervise()
                if on_progress is not None:
                    on_progress(budget_state(self.study))
                time.sleep(poll)
            if self._signals:
                logger.warning(
                    "Stopping: each worker finishes its epoch (up to %.0f s); signal again to "
                    "kill them now and hand their trials back.",
                    self.stop_timeout + STOP_GRACE,
                )
                self.stop()
                raise KeyboardInterrupt
        return budget_state(self.study)

    def stop(self, timeout: float | None = None) -> None:
        """Ask every worker to stop at its next epoch; kill and hand back what is left.

        Workers still running `timeout` seconds later (default: their stop timeout plus
        `STOP_GRACE`), or all of them at once when a second signal arrives, are killed, and
        the trials they were running are failed and queued again.
        """
        self._stopping = True
        signals_before = len(self._signals)
        alive = [c for c in self.children if c.process and c.process.poll() is None]
        for child in alive:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        wait = self.stop_timeout + STOP_GRACE if timeout is None else timeout
        deadline = time.monotonic() + wait
        while any(c.process and c.process.poll() is None for c in alive):
            if time.monotonic() >= deadline or len(self._signals) > max(1, signals_before):
                break
            time.sleep(0.1)
        killed = []
        for child in alive:
            assert child.process is not None
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()
                killed.append(child.worker_id)
        for child in self.children:
            child.done = True
            if child.log:
                child.log.close()
        if killed:
            logger.warning("Killed workers %s; handing their trials back.", ", ".join(killed))
            self._hand_back(set(killed))

    def failure_summary(self, final: BudgetState) -> str:
        """One line for a study left unfinished: the first real cause, where the logs are."""
        cause = self.first_cause()
        return (
            f"workers stopped with {final.finished} of {final.n_trials} trials finished"
            + (f": {cause}" if cause else "")
            + f"; logs in {self.log_dir}"
        )

    def first_cause(self) -> str | None:
        """Why the workers stopped: the last error line of a worker log, else the signal that
        killed one, else the last `fail_reason` of a trial this launcher's workers ran."""
        for child in self.children:
            cause = _last_error_line(child.log_path)
            if cause:
                return cause
        for child in self.children:
            if child.last_exit is not None and child.last_exit < 0:
                name = _signal_name(-child.last_exit)
                hint = " (out of memory?)" if name == "SIGKILL" else ""
                return f"worker {child.worker_id} was killed by {name}{hint}"
        ours = {i for c in self.children for i in c.worker_ids}
        failed = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.user_attrs.get(record.WORKER) in ours and t.user_attrs.get(record.FAIL_REASON)
        ]
        return str(failed[-1].user_attrs[record.FAIL_REASON]) if failed else None

    def _start(self, child: _Child) -> None:
        child.starts += 1
        child.worker_id = f"{self.host}-{self.token}-w{child.plan.index}.{child.starts}"
        child.worker_ids.append(child.worker_id)
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
            "--stop-timeout",
            f"{self.stop_timeout:g}",
        ]
        if self.checkpoint_dir:
            command += ["--checkpoint-dir", self.checkpoint_dir]
        child.log = child.log_path.open("ab")
        child.process = subprocess.Popen(
            command, env=env, stdout=child.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        child.started_at = time.monotonic()
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
        running = [c for c in self.children if not c.done and c.process is not None]
        finished_by = self._finished_worker_ids() if any(c.restarts for c in running) else set()
        for child in running:
            assert child.process is not None
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            code = child.process.poll()
            healthy = now - child.started_at >= self.healthy_after
            if child.restarts and (healthy or child.worker_id in finished_by):
                logger.info("Worker %s is healthy again.", child.worker_id)
                child.restarts = 0
            if code is None:
                continue
            if child.log:
                child.log.close()
            child.last_exit = code
            self._exited(child, code, now)

    def _exited(self, child: _Child, code: int, now: float) -> None:
        state = budget_state(self.study)
        if self._stopping or state.done:
            child.done = True
        elif code == EXIT_RECYCLE:
            logger.info("Worker %s asked to be replaced; starting a fresh one.", child.worker_id)
            self._start(child)
        elif code == 2 or child.restarts >= MAX_RESTARTS:
            child.done = True
            logger.error(
                "Worker %s exited with code %d; not restarting it (see %s).",
                child.worker_id,
                code,
                child.log_path,
            )
        elif code == 0:
            child.restarts += 1
            logger.warning(
                "Worker %s exited while the study is not done (%d of %d finished): stopped by a "
                "signal this launcher did not send? Restarting it (%d/%d).",
                child.worker_id,
                state.finished,
                state.n_trials,
                child.restarts,
                MAX_RESTARTS,
            )
            self._start(child)
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

    def _finished_worker_ids(self) -> set[str]:
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        return {
            str(t.user_attrs.get(record.WORKER))
            for t in self.study.get_trials(deepcopy=False, states=done)
        }

    def _hand_back(self, worker_ids: set[str]) -> None:
        """Trials left RUNNING by the workers this launcher killed are failed and requeued."""
        storage = optuna_compat.storage_of(self.study)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get(record.WORKER) not in worker_ids:
                continue
            fail_and_requeue(
                storage,
                optuna_compat.study_id(self.study),
                optuna_compat.trial_id(trial),
                Outcome.INTERRUPTED,
                max_retries=None,
            )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_error_line(path: Path) -> str | None:
    """The last `Error: ...` line of a worker log, else the last line of its last traceback."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line.removeprefix("Error: ").strip()
    for line in reversed(lines):
        if _TRACEBACK_LAST.match(line):
            return line.strip()
    return None
