"""Time limits on a running trial, and the worker process's signals and exit.

`Watchdog` enforces the spec's `workers.epoch_timeout` (seconds between two reports) and
`workers.trial_timeout` (seconds from claim to end): a trial past either is failed as timed
out (retried up to `max_retries`, counted towards `max_failures`) and the process exits with
`EXIT_RECYCLE`, since a hung training step cannot be interrupted from Python; a launcher
replaces the process at once.

`run_worker` runs one worker with signal handling: the first SIGTERM/SIGINT finishes the
current epoch and hands the trial back; a second one, or no epoch boundary within
`stop_timeout` seconds, hands it back at once and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.worker import Worker, WorkerResult

logger = logging.getLogger(__name__)

#: Exit code of a worker that wants to be replaced by a fresh process (a launcher restarts
#: it at once and does not count it as a crash): after a timeout or an out-of-memory error.
EXIT_RECYCLE = 75
#: A worker's default wait for an epoch boundary after SIGTERM (a launcher waits longer).
STOP_TIMEOUT = 50.0
#: Set to 1 by a launcher: its workers exit with `EXIT_RECYCLE` after an out-of-memory error.
RECYCLE_ENV = "SEARCH_WORKER_RECYCLE"


class Watchdog:
    """Watch one trial at a time for `epoch_timeout` / `trial_timeout` seconds."""

    def __init__(
        self, epoch_timeout: float | None, trial_timeout: float | None, *, poll: float = 0.5
    ) -> None:
        for name, value in (("epoch_timeout", epoch_timeout), ("trial_timeout", trial_timeout)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, but got {name}={value!r}")
        self.epoch_timeout = epoch_timeout
        self.trial_timeout = trial_timeout
        self.poll = poll
        self.reporter: Any = None  # whose `last_report` (monotonic seconds) is watched
        self.reason = ""

    @contextlib.contextmanager
    def watching(self, on_timeout: Callable[[], None]) -> Iterator[None]:
        if self.epoch_timeout is None and self.trial_timeout is None:
            yield
            return
        started, stop = time.monotonic(), threading.Event()
        thread = threading.Thread(
            target=self._watch, args=(started, stop, on_timeout), daemon=True, name="watchdog"
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            self.reporter = None

    def overdue(self, started: float, now: float) -> str | None:
        """Why the trial is past a limit at `now`, or None."""
        if self.trial_timeout is not None and now - started > self.trial_timeout:
            return (
                f"it ran {now - started:.0f} s, past workers.trial_timeout={self.trial_timeout:g}"
            )
        last = getattr(self.reporter, "last_report", None) or started
        if self.epoch_timeout is not None and now - max(last, started) > self.epoch_timeout:
            return (
                f"no report for {now - max(last, started):.0f} s, past "
                f"workers.epoch_timeout={self.epoch_timeout:g}"
            )
        return None

    def _watch(
        self, started: float, stop: threading.Event, on_timeout: Callable[[], None]
    ) -> None:
        while not stop.wait(self.poll):
            reason = self.overdue(started, time.monotonic())
            if reason is None:
                continue
            self.reason = reason
            try:
                on_timeout()
            except Exception:
                logger.exception("Could not fail the timed-out trial; the reaper will.")
            logging.shutdown()
            os._exit(EXIT_RECYCLE)


def run_worker(
    study_name: str,
    storage_url: str,
    *,
    device: str = "cpu",
    worker_id: str | None = None,
    checkpoint_dir: str | None = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> WorkerResult:
    """Run one worker in this process with signal handling; used by `search worker`."""
    from search.worker import Worker

    stop_event = threading.Event()
    signalled: list[int] = []

    def on_signal(signum: int, _: Any) -> None:
        # Runs between any two bytecodes of the main thread, possibly inside Event.set() of an
        # earlier signal: only list.append here, the "stop" thread sets the events.
        signalled.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker = Worker(
        study_name,
        storage_url,
        device=device,
        worker_id=worker_id,
        checkpoint_dir=checkpoint_dir,
        stop_event=stop_event,
        recycle=os.environ.get(RECYCLE_ENV) == "1",
    )
    finished = threading.Event()
    threading.Thread(
        target=_watch_stop,
        args=(worker, signalled, finished, stop_timeout),
        daemon=True,
        name="stop",
    ).start()
    try:
        return worker.run()
    finally:
        finished.set()


def _watch_stop(
    worker: Worker,
    signalled: list[int],
    finished: threading.Event,
    timeout: float,
) -> None:
    while not signalled:
        if finished.wait(0.1):
            return
    worker.stop_event.set()
    logger.info("Worker %s asked to stop; finishing the current epoch.", worker.worker_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(signalled) < 2:
        if finished.wait(0.1):
            return
    _force_exit(worker)


def _force_exit(worker: Worker) -> None:
    from search.record import Outcome

    trial = worker._current
    if trial is not None:
        logger.warning("Handing trial %d back now, without waiting for the epoch.", trial.number)
        try:
            worker.end(trial, Outcome.PREEMPTED)
        except Exception:
            logger.exception("Could not hand trial %d back; the reaper will.", trial.number)
    logging.shutdown()
    os._exit(0)
