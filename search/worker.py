"""A stateless worker: claim a trial, train it on one device, report, repeat until the budget.

Any number of workers on any machines may run against one study; they share nothing but the
database. Each worker also reaps: it fails trials whose heartbeat went stale (their worker was
killed or lost) and queues a retry with the same parameters, which resumes from the dead
trial's checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from search.budget import BUDGET_ATTR, budget_state, study_lock
from search.checkpoint import Checkpoints
from search.exceptions import EarlyStopped, Preempted, SearchError, TrialLost
from search.heartbeat import Heartbeat, reap_stale_trials
from search.objective import (
    CONSTRAINT,
    Reporter,
    build_training_function,
    call_training,
)
from search.oom import (
    OomRegistry,
    is_out_of_memory,
    peak_memory_mb,
    release_device_memory,
    reset_peak_memory,
)
from search.retry import (
    fail_and_requeue,
    replay_chain,
    retry_root,
    system_attrs,
)
from search.space import suggest, trainer_params
from search.spec import StudySpec
from search.storage import open_storage
from search.study import load_study, study_uuid, worker_seed

logger = logging.getLogger(__name__)


@dataclass
class WorkerResult:
    """What one worker did, for its exit code and log."""

    finished: int = 0
    failed: int = 0
    preempted: bool = False
    trials: list[int] = field(default_factory=list)


class Worker:
    """One worker process's loop over trials of one study on one device."""

    def __init__(
        self,
        study_name: str,
        storage_url: str,
        *,
        device: str = "cpu",
        worker_id: str | None = None,
        checkpoint_dir: str | None = None,
        poll_interval: float = 0.5,
        stop_event: threading.Event | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, but got {poll_interval=}")
        self.device = device
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.poll_interval = poll_interval
        self.stop_event = stop_event or threading.Event()
        # Optuna warns that heartbeats are meant for Study.optimize; this worker runs its own.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        self.storage = open_storage(storage_url)
        self.study, spec = load_study(
            study_name, self.storage, seed=lambda base: worker_seed(base, self.worker_id)
        )
        self.spec: StudySpec = spec
        self.storage.heartbeat_interval = spec.workers.heartbeat_interval
        self.storage.grace_period = spec.workers.grace_period
        self.checkpoint_dir = checkpoint_dir or spec.workers.checkpoint_dir
        self.training = build_training_function(spec)
        self.checkpoints: Checkpoints | None = None
        if self.checkpoint_dir:
            import torch  # noqa: F401  (checkpoints need it: import it before holding a trial)

            self.checkpoints = Checkpoints(self.checkpoint_dir, study_name, study_uuid(self.study))
            self.checkpoints.check_writable()

        self.oom = OomRegistry(self.study, device)
        self._current: optuna.Trial | None = None

    def run(self) -> WorkerResult:
        """Loop until the budget is met, the worker is stopped, or failures exceed the limit."""
        result = WorkerResult()
        reaper = threading.Thread(target=self._reap_forever, daemon=True, name="reaper")
        reaper.start()
        while not self.stop_event.is_set():
            self.reap()
            trial, state = self._claim()
            if trial is None:
                if state.done:
                    logger.info(
                        "Study %r has %d finished trials of %d; worker %s exits.",
                        self.study.study_name,
                        state.finished,
                        state.n_trials,
                        self.worker_id,
                    )
                    break
                self.stop_event.wait(self.poll_interval)
                continue
            outcome = self._run_trial(trial)
            result.trials.append(trial.number)
            if outcome in (TrialState.COMPLETE, TrialState.PRUNED):
                result.finished += 1
            elif outcome == TrialState.FAIL:
                result.failed += 1
                self._check_failures()
        result.preempted = self.stop_event.is_set()
        self.stop_event.set()
        return result

    def _claim(self) -> tuple[optuna.Trial | None, Any]:
        with study_lock(self.study):
            state = budget_state(self.study)
            if state.done or not (state.has_free_slot or state.waiting):
                return None, state
            trial = self.study.ask()
            self.storage.record_heartbeat(trial._trial_id)
            return trial, state

    def _run_trial(self, trial: optuna.Trial) -> TrialState | None:
        """Run one claimed trial; the heartbeat beats from the first moment to the last."""
        heartbeat = Heartbeat(self.storage, trial._trial_id, self.spec.workers.heartbeat_interval)
        heartbeat.start()
        self._current = trial
        try:
            return self._attempt(trial)
        except (TrialLost, optuna.exceptions.UpdateFinishedTrialError) as e:
            logger.warning("Trial %d dropped: finished by another process (%s).", trial.number, e)
            return None
        finally:
            heartbeat.stop()
            self._current = None

    def _attempt(self, trial: optuna.Trial) -> TrialState | None:
        spec = self.spec
        params = suggest(trial, spec)
        train_params, derived = trainer_params(params, spec)
        for key, value in {
            **derived,
            "worker": self.worker_id,
            "host": socket.gethostname(),
            "device": self.device,
            "pid": os.getpid(),
        }.items():
            trial.set_user_attr(key, value)
        root = retry_root(trial)
        history = self._resume_history(trial)
        if root != trial.number:
            logger.info(
                "Trial %d retries trial %d from epoch %d.", trial.number, root, len(history)
            )
        blocker = self.oom.blocking_record(train_params)
        if blocker is not None:
            reason = f"oom-skip: at least as large as {blocker}, which ran out of memory"
            trial.set_user_attr("fail_reason", reason)
            logger.info("Trial %d skipped: %s.", trial.number, reason)
            return self._tell(trial, TrialState.FAIL)
        checkpoint = self.checkpoints.for_chain(root) if self.checkpoints else None
        reporter = Reporter(trial, spec, stop_event=self.stop_event, history=history)
        accumulation = self.oom.accumulation(train_params)
        if accumulation > 1:
            trial.set_user_attr("grad_accumulation", accumulation)
        logger.info("Trial %d started on %s with %s.", trial.number, self.device, params)
        reset_peak_memory(self.device)
        try:
            returned = call_training(
                self.training,
                train_params,
                self.device,
                reporter,
                checkpoint=checkpoint,
                accumulation_steps=accumulation,
            )
        except optuna.TrialPruned:
            logger.info(
                "Trial %d pruned: %s.",
                trial.number,
                trial.user_attrs.get("prune_reason", "pruned"),
            )
            return self._tell(trial, TrialState.PRUNED)
        except EarlyStopped as e:
            trial.set_user_attr("early_stopped", str(e))
            logger.info("Trial %d stopped early: %s.", trial.number, e)
            return self._complete(trial, reporter, None)
        except Preempted:
            self._hand_back(trial, "preempted")
            return None
        except (TrialLost, optuna.exceptions.UpdateFinishedTrialError):
            raise
        except Exception as e:
            if is_out_of_memory(e):
                release_device_memory(self.device)
                return self._fail_oom(trial, train_params, accumulation)
            if isinstance(e, SearchError):
                raise
            logger.exception("Trial %d failed: %s", trial.number, e)
            self._annotate(trial, "fail_reason", f"error: {type(e).__name__}: {e}"[:500])
            return self._tell(trial, TrialState.FAIL)
        finally:
            peak = peak_memory_mb(self.device)
            if peak is not None:
                self._annotate(trial, "peak_gpu_memory_mb", peak)
        return self._complete(trial, reporter, returned)

    def _complete(
        self, trial: optuna.Trial, reporter: Reporter, returned: Any
    ) -> TrialState | None:
        value = reporter.best
        if value is None and isinstance(returned, int | float) and math.isfinite(returned):
            value = float(returned)
        if value is None:
            self._annotate(trial, "fail_reason", "no finite value of the metric was reported")
            return self._tell(trial, TrialState.FAIL)
        state = self._tell(trial, TrialState.COMPLETE, value)
        logger.info(
            "Trial %d finished with %s=%.5g and params %s.",
            trial.number,
            self.spec.metric,
            value,
            trial.params,
        )
        return state

    def _tell(
        self, trial: optuna.Trial, state: TrialState, value: float | None = None
    ) -> TrialState | None:
        frozen = self.study.tell(trial, value, state=state, skip_if_finished=True)
        if frozen.state != state:
            logger.warning(
                "Trial %d was already %s when told %s.",
                trial.number,
                frozen.state.name,
                state.name,
            )
            return None
        return state

    def _annotate(self, trial: optuna.Trial, key: str, value: Any) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            trial.set_user_attr(key, value)

    def _fail_oom(
        self, trial: optuna.Trial, params: dict[str, Any], accumulation: int
    ) -> TrialState | None:
        shape: dict[str, Any] = {
            k: params[k] for k in ("batch_size", "depth", "width") if k in params
        }
        if accumulation > 1 and "batch_size" in shape:  # what did not fit was the micro-batch
            shape["batch_size"] = -(-shape["batch_size"] // accumulation)
        logger.warning(
            "Trial %d ran out of memory on %s with %s.", trial.number, self.device, shape
        )
        self._annotate(trial, "fail_reason", "oom")
        self._annotate(trial, "oom_config", shape)
        if CONSTRAINT not in trial.constraints:
            trial.set_constraint(CONSTRAINT, 1.0)
        self.oom.record(shape, trial.number)
        # Each retry halves the micro-batch, so the chain ends (at a micro-batch of one).
        if (
            self.spec.workers.oom_grad_accumulation
            and self.oom.accumulation(params) > accumulation
        ):
            with study_lock(self.study):
                fail_and_requeue(
                    self.study,
                    trial._trial_id,
                    reason="oom-accumulate",
                    fail_reason="oom",
                    count_against_limit=False,
                )
            return TrialState.FAIL
        return self._tell(trial, TrialState.FAIL)

    def _hand_back(self, trial: optuna.Trial, reason: str) -> None:
        """Fail the trial as not the config's fault and queue a retry with the same params."""
        with study_lock(self.study):
            fail_and_requeue(self.study, trial._trial_id, reason=reason, count_against_limit=False)
        logger.info("Trial %d handed back (%s); it will be retried.", trial.number, reason)

    def _resume_history(self, trial: optuna.Trial) -> list[dict[str, float]]:
        """A retried trial with a checkpoint gets its chain's curve up to that epoch."""
        if not self.checkpoints or not system_attrs(trial).get("retry_history"):
            return []
        state = self.checkpoints.for_chain(retry_root(trial)).load()
        done = int(state["epoch"]) if state and "epoch" in state else 0
        return replay_chain(trial, metric=self.spec.metric, upto_epoch=done)

    def reap(self) -> int:
        """Fail RUNNING trials with a stale heartbeat and queue their retries; returns count."""
        return reap_stale_trials(
            self.study,
            self.storage,
            grace_period=self.spec.workers.grace_period,
            max_retries=self.spec.workers.max_retries,
        )

    def _reap_forever(self) -> None:
        interval = max(1.0, self.spec.workers.grace_period / 4)
        while not self.stop_event.wait(interval):
            try:
                self.reap()
            except Exception:
                logger.exception("Reaping stale trials failed; will try again.")

    def _check_failures(self) -> None:
        """Stop when trials keep failing with errors (a bug in the objective, a bad install)."""
        budget = int(self.study.user_attrs.get(BUDGET_ATTR, 0))
        limit = self.spec.workers.max_failures or max(5, budget)
        failed = [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if str(t.user_attrs.get("fail_reason", "error")).startswith("error")
        ]
        if len(failed) >= limit:
            raise TooManyFailures(
                f"{len(failed)} trials failed with errors (max_failures={limit}); the last: "
                f"{failed[-1].user_attrs.get('fail_reason', 'unknown')}"
            )


class TooManyFailures(SearchError):
    """The study's trials keep failing with errors; stopping beats burning the budget."""


def run_worker(
    study_name: str,
    storage_url: str,
    *,
    device: str = "cpu",
    worker_id: str | None = None,
    checkpoint_dir: str | None = None,
    stop_timeout: float = 50.0,
) -> WorkerResult:
    """Run one worker in this process with signal handling; used by `search worker`.

    After SIGTERM the current epoch finishes, the trial is handed back for a retry and the
    worker returns; if no epoch boundary comes within `stop_timeout` seconds, the trial is
    handed back from the signal's timer and the process exits 0 at once.
    """
    stop_event = threading.Event()
    signalled: list[int] = []

    def on_signal(signum: int, _: Any) -> None:
        # Runs between any two bytecodes of the main thread, possibly inside Event.set() of an
        # earlier signal: only the first signal touches the event (its lock is not reentrant).
        if not signalled:
            signalled.append(signum)
            stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker = Worker(
        study_name,
        storage_url,
        device=device,
        worker_id=worker_id,
        checkpoint_dir=checkpoint_dir,
        stop_event=stop_event,
    )
    finished = threading.Event()
    threading.Thread(
        target=_watch_stop, args=(worker, finished, stop_timeout), daemon=True, name="stop"
    ).start()
    try:
        return worker.run()
    finally:
        finished.set()


def _watch_stop(worker: Worker, finished: threading.Event, timeout: float) -> None:
    worker.stop_event.wait()
    if finished.is_set():
        return
    logger.info("Worker %s asked to stop; finishing the current epoch.", worker.worker_id)
    if not finished.wait(timeout):
        _force_exit(worker)


def _force_exit(worker: Worker) -> None:
    trial = worker._current
    if trial is not None:
        logger.warning(
            "No epoch boundary within the stop timeout; handing trial %d back now.", trial.number
        )
        try:
            worker._hand_back(trial, "preempted")
        except Exception:
            logger.exception("Could not hand trial %d back; the reaper will.", trial.number)
    logging.shutdown()
    os._exit(0)
