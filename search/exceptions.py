"""Every error this package raises on purpose.

The tree::

    SearchError                 root: the CLI prints it as one line and exits 2
    ├── SpecError               a study file is malformed or invalid (names file and field)
    ├── StorageError            the database cannot be reached or used (URL always masked)
    ├── StudyConflictError      an existing study was defined differently
    ├── StudyNotFoundError      no study of that name in the storage
    ├── ObjectiveError          the objective cannot be imported, or breaks the contract
    ├── TooManyFailures         the study's trials keep failing (max_failures reached)
    ├── LaunchError             `search launch` cannot start its workers as asked (a GPU absent)
    └── CheckpointError         the checkpoint folder cannot be created or written
        └── DiskFullError       ... because its filesystem is full (ENOSPC)

Signals that flow from the training loop back to the worker (not errors):

    StopTrial                   base: the trainable must let these propagate
    ├── EarlyStopped            no improvement for `patience` epochs, or ended at its best
    ├── TrialLost               another process failed this trial (stale heartbeat); drop it
    └── Preempted               SIGTERM arrived; checkpoint and hand the trial back
"""

from __future__ import annotations


class SearchError(Exception):
    """Root of every error the `search` package raises on purpose."""


class SpecError(SearchError, ValueError):
    """A study file is malformed or fails validation."""


class StorageError(SearchError):
    """The storage cannot be reached or used; the message masks any password."""


class StudyConflictError(SearchError):
    """An existing study's stored spec conflicts with the spec being launched."""


class StudyNotFoundError(SearchError):
    """No study with the requested name exists in the storage."""


class ObjectiveError(SearchError):
    """The objective named in a spec cannot be imported or does not fit the contract."""


class TooManyFailures(SearchError):
    """The study's trials keep failing with errors; stopping beats burning the budget."""


class LaunchError(SearchError):
    """The launcher cannot start its workers as asked (e.g. a requested GPU is absent)."""


class CheckpointError(SearchError):
    """The checkpoint folder cannot be created or a checkpoint cannot be written."""


class DiskFullError(CheckpointError):
    """A checkpoint could not be written because its filesystem is full (ENOSPC)."""


class StopTrial(Exception):
    """Raised by `report` to end a trial early; user training code must not swallow it."""


class EarlyStopped(StopTrial):
    """A healthy trial ends at its best: no improvement for `patience` epochs, or a pruning
    rule that ends rather than prunes (`rule`); the trial completes with its best value."""

    def __init__(self, reason: str, *, rule: str | None = None) -> None:
        super().__init__(reason)
        self.rule = rule


class TrialLost(StopTrial):
    """Another process already finished this trial (e.g. failed it for a stale heartbeat)."""


class Preempted(StopTrial):
    """The worker was asked to stop (SIGTERM); the trial is handed back for a retry."""
