"""Heartbeats of running trials, and reaping the trials whose heartbeat went stale.

A running trial's worker records a heartbeat every `heartbeat_interval` seconds from a thread
of its own. Every worker also reaps: a RUNNING trial whose last heartbeat is older than
`grace_period` (its worker was killed, its machine lost) is failed and queued again with the
same parameters. Reaping happens under the study lock, so the retry takes the dead trial's
budget slot before any worker can claim it.
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any

import optuna
from optuna.trial import TrialState

from search.budget import study_lock
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
    storage: optuna.storages.RDBStorage,
    *,
    grace_period: int,
    max_retries: int,
) -> int:
    """Fail the study's RUNNING trials with a stale heartbeat and queue their retries.

    A trial that never recorded a heartbeat (its worker died right after claiming it) counts
    as stale once it has been running for longer than `grace_period`.

    Returns:
        How many trials this call failed (another worker may have reaped the rest).
    """
    if not _stale_ids(study, storage, grace_period):
        return 0
    reaped = 0
    with study_lock(study):
        for trial_id in _stale_ids(study, storage, grace_period):
            frozen = storage.get_trial(trial_id)
            if fail_and_requeue(
                study, trial_id, reason="heartbeat-stale", max_retries=max_retries
            ):
                logger.warning(
                    "Trial %d had no heartbeat for %d s (worker %s); failed it.",
                    frozen.number,
                    grace_period,
                    frozen.user_attrs.get("worker", "?"),
                )
                reaped += 1
    return reaped


def _stale_ids(
    study: optuna.Study, storage: optuna.storages.RDBStorage, grace_period: int
) -> list[int]:
    stale = set(storage._get_stale_trial_ids(study._study_id))
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace_period)
    old = [
        t._trial_id
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.datetime_start is not None and t.datetime_start < cutoff
    ]
    if old:
        stale.update(set(old) - _beating(storage, old))
    return sorted(stale)


def _beating(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> set[int]:
    """Which of `trial_ids` have ever recorded a heartbeat."""
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        rows = session.query(models.TrialHeartbeatModel.trial_id).filter(
            models.TrialHeartbeatModel.trial_id.in_(trial_ids)
        )
        return {row.trial_id for row in rows}
    finally:
        session.close()
