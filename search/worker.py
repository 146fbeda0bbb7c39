"""A stateless worker: claim a trial, train it on one device, report, repeat until the budget.

Any number of workers on any machines may run against one study; they share nothing but the
database. Each worker also reaps: it fails trials whose heartbeat went stale (their worker was
killed or lost) and queues a retry with the same parameters. How each trial ended decides
what happens next, by the one table `search.record.OUTCOMES`.

A worker's identity (`<host>-<pid>-<random>`) is unique per process and is not its sampler's
seed: a seeded study seeds the sampler from the spec's seed and the trial's number, so no
restart, relaunch or second launcher can replay another worker's parameters.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna

from search import config, objective, oom, optuna_compat, record
from search.budget import budget_state, claim
from search.checkpoint import Checkpoints
from search.ending import annotate, check_failures, check_result, end_trial
from search.exceptions import (
    DiskFullError,
    EarlyStopped,
    ObjectiveError,
    Preempted,
    SearchError,
    TrialLost,
)
from search.heartbeat import Heartbeat, Reaper
from search.record import Outcome, consequence
from search.reporter import PeerFeed, Reporter
from search.retry import resume_history, retry_root
from search.space import suggest, trainer_params
from search.spec import StudySpec
from search.storage import open_storage
from search.study import load_study, study_uuid, trial_seed
from search.watchdog import Watchdog

logger = logging.getLogger(__name__)


def worker_identity() -> str:
    """`<host>-<pid>-<random>`: unique per process, even after a restart with the same pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class WorkerResult:
    """What one worker did, for its exit code and log."""

    finished: int = 0
    failed: int = 0
    preempted: bool = False
    recycle: bool = False  # it asks to be replaced by a fresh process (after out-of-memory)
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
        recycle: bool = False,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, but got {poll_interval=}")
        self.device = device
        self.worker_id = worker_id or worker_identity()
        self.poll_interval = poll_interval
        self.stop_event = stop_event or threading.Event()
        self.recycle = recycle  # exit for a fresh process after out-of-memory (a launcher's)
        # Optuna warns that heartbeats are meant for Study.optimize; this worker runs its own.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        self.storage = open_storage(storage_url, create=False)  # it joins a study
        self.study, spec = load_study(study_name, self.storage)
        self.spec: StudySpec = spec
        self.storage.heartbeat_interval = spec.workers.heartbeat_interval
        self.storage.grace_period = spec.workers.grace_period
        self.checkpoint_dir = config.checkpoint_dir(checkpoint_dir, spec.workers.checkpoint_dir)
        self.training = objective.build_training_function(spec)
        self.checkpoints: Checkpoints | None = None
        if self.checkpoint_dir:
            import torch  # noqa: F401  (checkpoints need it: import it before holding a trial)

            self.checkpoints = Checkpoints(self.checkpoint_dir, study_name, study_uuid(self.study))
            self.checkpoints.check_writable()
        self.oom = oom.OomRegistry(self.study, device)
        self.peers = PeerFeed(self.study)
        self.watchdog = Watchdog(spec.workers.epoch_timeout, spec.workers.trial_timeout)
        self._current: optuna.Trial | None = None
        self._reporter: Reporter | None = None

    def run(self) -> WorkerResult:
        """Loop until the budget is met, the worker is stopped, or failures exceed the limit."""
        result = WorkerResult()
        reaper = Reaper(self.study, self.storage, self.spec.workers, self.stop_event)
        reaper.reap()
        reaper.start()
        while not self.stop_event.is_set() and not result.recycle:
            trial = claim(self.study)
            if trial is None:
                state = budget_state(self.study)
                if state.done:
                    logger.info(
                        "Study %r has %d finished trials of %d; worker %s exits.",
                        self.study.study_name,
                        state.finished,
                        state.n_trials,
                        self.worker_id,
                    )
                    check_result(self.study)
                    break
                self.stop_event.wait(self.poll_interval)
                continue
            outcome = self._run_trial(trial)
            result.trials.append(trial.number)
            rule = consequence(outcome)
            result.finished += rule.state in (
                optuna.trial.TrialState.COMPLETE,
                optuna.trial.TrialState.PRUNED,
            )
            result.failed += rule.state == optuna.trial.TrialState.FAIL
            recycle_after = self.spec.workers.recycle_after
            result.recycle = self.recycle and (
                outcome is Outcome.OUT_OF_MEMORY
                or (recycle_after is not None and len(result.trials) >= recycle_after)
            )
            if rule.counts_failure:
                check_failures(self.study, self.spec.workers.max_failures)
        result.preempted = self.stop_event.is_set()
        self.stop_event.set()
        return result

    def _run_trial(self, trial: optuna.Trial) -> Outcome:
        """Run one claimed trial; the heartbeat beats from the first moment to the last."""
        trial_id = optuna_compat.trial_id(trial)
        heartbeat = Heartbeat(self.storage, trial_id, self.spec.workers.heartbeat_interval)
        heartbeat.start()
        self._current = trial
        try:
            with self.watchdog.watching(lambda: self._time_out(trial)):
                return self._attempt(trial)
        except (TrialLost, optuna.exceptions.UpdateFinishedTrialError) as e:
            logger.warning("Trial %d dropped: finished by another process (%s).", trial.number, e)
            return Outcome.LOST
        finally:
            heartbeat.stop()
            self._current = self._reporter = None

    def _attempt(self, trial: optuna.Trial) -> Outcome:
        spec = self.spec
        if spec.seed is not None:
            optuna_compat.reseed_sampler(self.study.sampler, trial_seed(spec.seed, trial.number))
        params = suggest(trial, spec)
        train_params, derived = trainer_params(params, spec)
        place: dict[str, Any] = {record.WORKER: self.worker_id, record.HOST: socket.gethostname()}
        place.update({record.DEVICE: self.device, record.PID: os.getpid()})
        optuna_compat.set_user_attrs(self.storage, trial, {**derived, **place})
        blocker = self.oom.blocking_record(train_params)
        if blocker is not None:
            detail = f"at least as large as {blocker}, which ran out of memory"
            return self.end(trial, Outcome.OOM_SKIPPED, detail=detail)
        root = retry_root(trial)
        checkpoint = self.checkpoints.for_chain(root) if self.checkpoints else None
        history = resume_history(trial, root, checkpoint, metric=spec.metric)
        reporter = Reporter(
            trial,
            spec,
            params=train_params,
            peers=self.peers,
            stop_event=self.stop_event,
            history=history,
            best_checkpoint=checkpoint if spec.workers.keep_checkpoints == "best" else None,
        )
        self._reporter = reporter
        self.watchdog.reporter = reporter
        accumulation = self.oom.accumulation(train_params)
        if accumulation > 1:
            trial.set_user_attr(record.GRAD_ACCUMULATION, accumulation)
        logger.info("Trial %d started on %s with %s.", trial.number, self.device, params)
        oom.reset_peak_memory(self.device)
        try:
            returned = objective.call_training(
                self.training,
                train_params,
                self.device,
                reporter,
                checkpoint=checkpoint,
                accumulation_steps=accumulation,
            )
        except optuna.TrialPruned as e:
            return self.end(trial, Outcome.PRUNED, detail=str(e))
        except EarlyStopped as e:
            if e.rule is None:
                trial.set_user_attr(record.EARLY_STOPPED, str(e))
            return self._complete(trial, reporter, None, ended=str(e))
        except Preempted:
            return self.end(trial, Outcome.PREEMPTED)
        except (TrialLost, optuna.exceptions.UpdateFinishedTrialError):
            raise
        except ObjectiveError as e:  # a broken contract: every trial would fail the same way
            self.end(trial, Outcome.OBJECTIVE_ERROR, detail=str(e))
            raise
        except SearchError as e:
            self.end(trial, _search_error_outcome(e), detail=str(e))
            raise
        except Exception as e:
            if oom.is_out_of_memory(e):
                oom.release_device_memory(self.device)
                return self._fail_oom(trial, train_params, accumulation)
            logger.exception("Trial %d failed: %s", trial.number, e)
            return self.end(trial, Outcome.OBJECTIVE_ERROR, detail=f"{type(e).__name__}: {e}")
        finally:
            peak = oom.peak_memory_mb(self.device)
            if peak is not None:
                annotate(trial, record.PEAK_GPU_MEMORY_MB, peak)
        return self._complete(trial, reporter, returned)

    def _complete(
        self, trial: optuna.Trial, reporter: Reporter, returned: Any, *, ended: str | None = None
    ) -> Outcome:
        value, epoch = reporter.best, reporter.best_epoch
        if value is None:
            value = objective.returned_value(returned)
        if value is None:
            detail = (
                f"the objective reported no finite {self.spec.metric} and returned "
                f"{objective.describe_returned(returned)}"
            )
            return self.end(trial, Outcome.UNUSABLE_RESULT, detail=detail)
        if reporter.history:
            trial.set_user_attr(record.BEST_EPOCH, epoch)
        return self.end(trial, Outcome.ENDED if ended else Outcome.COMPLETE, value=value)

    def end(self, trial: optuna.Trial, outcome: Outcome, **how: Any) -> Outcome:
        """End `trial` with `outcome` as the outcome table says (`search.ending`); a chain
        that ends for good leaves no checkpoint (but its best weights, if asked)."""
        history = self._reporter.history if self._reporter else None
        ended = end_trial(
            self.study,
            trial,
            outcome,
            max_retries=self.spec.workers.max_retries,
            history=history,
            **how,
        )
        rule = consequence(ended)
        if rule.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            self.peers.add_own(optuna_compat.trial_id(trial))  # compared with at once
        if (
            self.checkpoints
            and rule.state is not None
            and not (rule.retried or how.get("retried"))
        ):
            keep = self.spec.workers.keep_checkpoints == "best" and rule.state.name == "COMPLETE"
            self.checkpoints.finished(retry_root(trial), keep=keep)
        return ended

    def _fail_oom(self, trial: optuna.Trial, params: dict[str, Any], accumulation: int) -> Outcome:
        shape = oom.oom_shape(params, accumulation)
        logger.warning(
            "Trial %d ran out of memory on %s with %s.", trial.number, self.device, shape
        )
        annotate(trial, record.OOM_CONFIG, shape)
        if record.CONSTRAINT not in trial.constraints:
            optuna_compat.storage_of(self.study).set_trial_system_attr(
                optuna_compat.trial_id(trial), record.CONSTRAINT_KEY, 1.0
            )
        self.oom.record(shape, trial.number)
        # Each retry halves the micro-batch, so the chain ends (at a micro-batch of one).
        again = self.oom.accumulation(params) > accumulation
        return self.end(trial, Outcome.OUT_OF_MEMORY, retried=again)

    def _time_out(self, trial: optuna.Trial) -> None:
        """Called by the watchdog thread: fail the hung trial, then replace this process."""
        logger.error("Trial %d timed out: %s.", trial.number, self.watchdog.reason)
        self.end(trial, Outcome.TIMED_OUT, detail=self.watchdog.reason)


def _search_error_outcome(error: SearchError) -> Outcome:
    return Outcome.DISK_FULL if isinstance(error, DiskFullError) else Outcome.OBJECTIVE_ERROR
