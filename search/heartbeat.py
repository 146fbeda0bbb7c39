"""Heartbeats of running trials, and reaping the trials whose heartbeat went stale.

A running trial's worker records a heartbeat every `heartbeat_interval` seconds from a thread
of its own. Every worker also reaps: a RUNNING trial whose last heartbeat is older than
`grace_period` (its worker was killed, its machine lost) is failed and queued again with the
same parameters. Reaping happens under the study lock, so the retry takes the dead trial's
budget slot before any worker can claim it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import optuna
from optuna.trial import TrialState

from search.budget import study_lock
from search.retry import enqueue_retry

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
    storage: optuna.storages.RDBStorage,
    *,
    grace_period: int,
    max_retries: int,
) -> int:
    """Fail the study's RUNNING trials with a stale heartbeat and queue their retries.

    Returns:
        How many trials this call failed (another worker may have reaped the rest).
    """
    if not storage._get_stale_trial_ids(study._study_id):
        return 0
    reaped = 0
    with study_lock(study):
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            try:
                if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            frozen = storage.get_trial(trial_id)
            logger.warning(
                "Trial %d had no heartbeat for %d s (worker %s); failed it.",
                frozen.number,
                grace_period,
                frozen.user_attrs.get("worker", "?"),
            )
            enqueue_retry(study, frozen, reason="heartbeat-stale", max_retries=max_retries)
            reaped += 1
    return reaped
