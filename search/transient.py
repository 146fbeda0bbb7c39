"""Transient database errors and the retrying every storage call goes through.

A dropped connection (`pg_terminate_backend`, a server restart, a network blip) or a short
outage fails a call with a connection error; `retry_transient` runs the call again on a new
connection, with backoff, for up to two minutes, instead of killing a worker or a launcher.
A leaf module, so the storage, the atomic steps of `search.optuna_compat` and the study lock
all retry the same way.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc

logger = logging.getLogger(__name__)

#: How long a storage call keeps retrying a dropped connection or an outage.
OUTAGE_SECONDS = 120.0
_T = TypeVar("_T")


def reason_of(error: BaseException) -> str:
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    original = getattr(cause, "orig", None) or cause
    text = " ".join(str(original).split())
    return text.split(" (Background on this error")[0][:300] or type(original).__name__


def is_transient(error: BaseException) -> bool:
    chain: BaseException | None = error
    while chain is not None:
        if isinstance(chain, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            return True
        if isinstance(chain, sqlalchemy.exc.DBAPIError) and chain.connection_invalidated:
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def retry_transient(
    call: Callable[..., _T], *, outage_seconds: float = OUTAGE_SECONDS
) -> Callable[..., _T]:
    """Retry `call(storage, ...)` on a dropped connection or outage, with backoff, for up to
    `outage_seconds`; other errors propagate at once. The first argument is the storage (an
    RDB storage, or Optuna's cache around one), whose thread's session is reset before each
    new try, or anything else for a call that opens its own connections."""

    @functools.wraps(call)
    def wrapper(storage: Any, *args: Any, **kwargs: Any) -> _T:
        deadline = time.monotonic() + outage_seconds
        delay = 0.2
        while True:
            try:
                return call(storage, *args, **kwargs)
            except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
                if not is_transient(e) or time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "Database call %s failed (%s); reconnecting in %.1f s.",
                    call.__name__,
                    reason_of(e),
                    delay,
                )
                sessions = getattr(getattr(storage, "_backend", storage), "scoped_session", None)
                if sessions is not None:  # a fresh connection for this thread's next try
                    sessions.remove()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    return wrapper
