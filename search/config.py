"""Where each setting comes from, in one place: CLI flag > environment variable > study file >
default. One function per setting; the README's "Where settings come from" table lists them.

A leaf module: it reads only its arguments and the environment, and imports nothing heavy.
"""

from __future__ import annotations

import math
import os
from typing import TypeVar

from search.exceptions import StorageError

STORAGE_ENV = "SEARCH_STORAGE"
DEFAULT_STORAGE = "sqlite:///search.db"
CONNECT_TIMEOUT_ENV = "SEARCH_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 30.0
MIN_MAX_FAILURES = 5

_T = TypeVar("_T")


def first_set(*candidates: _T | None, default: _T) -> _T:
    """The first candidate that is set (not None, not ""), else `default`: the precedence rule."""
    for candidate in candidates:
        if candidate is not None and candidate != "":
            return candidate
    return default


def storage_url(cli: str | None = None, spec: str | None = None) -> str:
    """`--storage` > `SEARCH_STORAGE` > the study file's `storage` > `sqlite:///search.db`."""
    return first_set(cli, os.environ.get(STORAGE_ENV), spec, default=DEFAULT_STORAGE)


def n_trials(cli: int | None, spec: int) -> int:
    """`--n-trials` > the study file's `n_trials` (which has its own default, 20)."""
    return first_set(cli, default=spec)


def checkpoint_dir(cli: str | None, spec: str | None) -> str | None:
    """`--checkpoint-dir` > the study file's `workers.checkpoint_dir` > none (no checkpoints)."""
    return first_set(cli, spec, default=None)


def connect_timeout(cli: float | None = None) -> float:
    """Seconds to wait for a starting database: the caller's value > `SEARCH_CONNECT_TIMEOUT` >
    30.

    Raises:
        StorageError: `SEARCH_CONNECT_TIMEOUT` is not a number of seconds >= 0.
    """
    raw = os.environ.get(CONNECT_TIMEOUT_ENV)
    try:
        from_env = None if raw is None or raw.strip() == "" else float(raw)
    except ValueError:
        from_env = math.nan
    if from_env is not None and not from_env >= 0:  # also catches NaN
        raise StorageError(f"{CONNECT_TIMEOUT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return first_set(cli, from_env, default=DEFAULT_CONNECT_TIMEOUT)


def max_failures(spec: int | None, n_trials: int) -> int:
    """The study file's `workers.max_failures` > `max(5, n_trials)`."""
    return first_set(spec, default=max(MIN_MAX_FAILURES, n_trials))
