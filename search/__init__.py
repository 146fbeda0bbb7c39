"""search: Optuna-based hyperparameter search for PyTorch training, from one box to a fleet.

The public names below are imported on first use (PEP 562), so `import search` and the `search`
command's help and usage errors do not pay for Optuna, SQLAlchemy and pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    "Checkpoint": "search.checkpoint",
    "Checkpoints": "search.checkpoint",
    "CheckpointError": "search.exceptions",
    "DiskFullError": "search.exceptions",
    "create_or_update_study": "search.study",
    "DivergencePruner": "search.pruning",
    "EarlyStopped": "search.exceptions",
    "ObjectiveError": "search.exceptions",
    "Preempted": "search.exceptions",
    "SearchError": "search.exceptions",
    "SpecError": "search.exceptions",
    "StopTrial": "search.exceptions",
    "StorageError": "search.exceptions",
    "StudyConflictError": "search.exceptions",
    "StudyNotFoundError": "search.exceptions",
    "StudySpec": "search.spec",
    "TrendPruner": "search.pruning",
    "TrialLost": "search.exceptions",
    "create_or_load_study": "search.study",
    "default_pruner": "search.pruning",
    "load_spec": "search.spec",
    "load_study": "search.study",
    "mask_url": "search.storage",
    "open_storage": "search.storage",
    "open_storage_read_only": "search.storage",
    "resolve_storage_url": "search.storage",
    "RunResult": "search.resumption",
    "launch": "search.resumption",
    "resume": "search.resumption",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
