"""search: Optuna-based hyperparameter search for PyTorch training, from one box to a fleet."""

from __future__ import annotations

from search.checkpoint import Checkpoint, Checkpoints
from search.exceptions import (
    CheckpointError,
    DiskFullError,
    EarlyStopped,
    ObjectiveError,
    Preempted,
    SearchError,
    SpecError,
    StopTrial,
    StorageError,
    StudyConflictError,
    StudyNotFoundError,
    TrialLost,
)
from search.pruning import DivergencePruner, TrendPruner, default_pruner
from search.resumption import RunResult, launch, resume
from search.spec import StudySpec, load_spec
from search.storage import mask_url, open_storage, open_storage_read_only, resolve_storage_url
from search.study import create_or_load_study, create_or_update_study, load_study

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Checkpoints",
    "DiskFullError",
    "DivergencePruner",
    "EarlyStopped",
    "ObjectiveError",
    "Preempted",
    "RunResult",
    "SearchError",
    "SpecError",
    "StopTrial",
    "StorageError",
    "StudyConflictError",
    "StudyNotFoundError",
    "StudySpec",
    "TrendPruner",
    "TrialLost",
    "create_or_load_study",
    "create_or_update_study",
    "default_pruner",
    "launch",
    "load_spec",
    "load_study",
    "mask_url",
    "open_storage",
    "open_storage_read_only",
    "resolve_storage_url",
    "resume",
]
