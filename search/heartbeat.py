"""Heartbeats of running trials, and reaping the trials whose heartbeat went stale.

A running trial's worker records a heartbeat every `heartbeat_interval` seconds from a thread
of its own. Every worker also reaps: a RUNNING trial whose last heartbeat is older than
`grace_period` (its worker was killed, its machine lost) is failed and queued again with the
same parameters, in the one transaction that fails it, so the retry holds the dead trial's
budget slot from the first moment.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import optuna

from search import optuna_compat, record
from search.epochs import stored_rows
from search.record import Outcome
from search.retry import fail_and_requeue

logger = logging.getLogger(__name__)


class Heartbeat:
    """Record a trial's heartbeat every `interval` seconds until stopped; never raises."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, but got {interval=}")
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception as e:
                logger.warning("Heartbeat for trial id %d failed: %s", self._trial_id, e)
            self._stop.wait(self._interval)


def reap_stale_trials(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    *,
    grace_period: float,
    max_retries: int,
) -> int:
    """Fail the study's RUNNING trials with a stale heartbeat and queue their retries.

    A trial whose worker died right after claiming it has the heartbeat its claim recorded,
    so it goes stale like any other. The dead trial's per-epoch rows are copied into its
    `epoch_metrics`, and the retry is queued in the same transaction that fails it.

    Returns:
        How many trials this call failed (another worker may have reaped the rest).
    """
    study_id = optuna_compat.study_id(study)
    reaped = 0
    for trial_id in optuna_compat.stale_running(storage, study_id, grace_period):
        rows = stored_rows(storage, trial_id)
        attrs = {record.EPOCH_METRICS: rows} if rows else {}
        if fail_and_requeue(
            storage,
            study_id,
            trial_id,
            Outcome.HEARTBEAT_LOST,
            max_retries=max_retries,
            attrs=attrs,
        ):
            frozen = storage.get_trial(trial_id)
            logger.warning(
                "Trial %d had no heartbeat for %g s (worker %s); failed it.",
                frozen.number,
                grace_period,
                frozen.user_attrs.get(record.WORKER, "?"),
            )
            reaped += 1
    return reaped


class Reaper:
    """A worker's thread that reaps the study's stale trials every `grace_period / 4` s."""

    def __init__(
        self,
        study: optuna.Study,
        storage: optuna.storages.BaseStorage,
        workers: Any,
        stop_event: threading.Event,
    ) -> None:
        self.study, self.storage, self.stop_event = study, storage, stop_event
        self.grace_period, self.max_retries = workers.grace_period, workers.max_retries
        self._thread = threading.Thread(target=self._forever, daemon=True, name="reaper")

    def start(self) -> None:
        self._thread.start()

    def reap(self) -> int:
        """Fail RUNNING trials with a stale heartbeat and queue their retries; returns count."""
        return reap_stale_trials(
            self.study, self.storage, grace_period=self.grace_period, max_retries=self.max_retries
        )

    def _forever(self) -> None:
        while not self.stop_event.wait(max(1.0, self.grace_period / 4)):
            try:
                self.reap()
            except Exception:
                logger.exception("Reaping stale trials failed; will try again.")
