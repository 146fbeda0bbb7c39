"""Resume any study from the database alone, and launch studies from Python (notebooks).

`resume(name)` needs only the study name and the storage URL: the spec is the one stored on
the study. Trials left RUNNING by dead workers whose heartbeat is already older than the
grace period are failed and queued again with their parameters at once; the rest are reaped
by the new workers once their grace period has passed. The sampler continues from the stored
trials, and the study ends at exactly its budget, however many resumes run at once (the budget
is claimed under the study lock).

`launch(spec)` is `search launch` from Python. Both return a `RunResult` whose `exit_code` is
the documented one: 0 done, 1 workers stopped before the budget (trials failed beyond the
retry bound or `max_failures`), 2 bad input, 3 interrupted.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from search import config
from search.budget import BUDGET_ATTR, BudgetState, budget_state
from search.exceptions import SearchError
from search.heartbeat import reap_stale_trials
from search.progress import progress_display
from search.spec import StudySpec, load_spec
from search.storage import mask_url, open_storage, open_storage_read_only
from search.study import create_or_load_study, load_study

logger = logging.getLogger(__name__)

EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3


@dataclass
class RunResult:
    """What a resume or launch did; `as_dict()` is the `--json` summary."""

    study: str
    storage: str  # masked
    status: str  # "done", "already-done", "failed", "interrupted"
    exit_code: int
    n_trials: int
    finished_before: int
    finished: int
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int
    reaped: int = 0
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"Study {self.study}: {self.status}, {self.finished}/{self.n_trials} finished "
            f"({self.complete} complete, {self.pruned} pruned, {self.failed} failed; "
            f"{self.finished_before} finished before)."
        ]
        if self.message:
            lines.append(self.message)
        if self.best_trial is not None and self.best_value is not None:
            lines.append(f"Best trial {self.best_trial}: {self.best_value:.6g} {self.best_params}")
        return "\n".join(lines)


def resume(
    study_name: str,
    storage: str | None = None,
    *,
    n_trials: int | None = None,
    workers: int | None = None,
    checkpoint_dir: str | None = None,
    log_dir: Path | None = None,
    progress: Console | None = None,
) -> RunResult:
    """Continue `study_name` from its stored spec until `n_trials` (default: its budget).

    A study already at its budget is left alone (status `already-done`); a larger `n_trials`
    extends it.

    Raises:
        StudyNotFoundError: no such study, or it was not created by `search`.
        SearchError: `n_trials` is below the trials already finished, or storage errors.
    """
    url = config.storage_url(storage)
    # A typo in a SQLite path is an error, not a new empty database.
    open_storage_read_only(url).engine.dispose()
    opened = open_storage(url)
    study, spec = load_study(study_name, opened)
    before = budget_state(study)
    if n_trials is not None:
        if n_trials < before.finished:
            raise SearchError(
                f"--n-trials {n_trials} is below the {before.finished} trials study "
                f"{study_name!r} already finished; give a total of at least {before.finished}"
            )
        if n_trials != before.n_trials:
            study.set_user_attr(BUDGET_ATTR, n_trials)
            logger.info("Study %r budget set to %d trials.", study_name, n_trials)
    return _run(study, opened, spec, url, before, workers, checkpoint_dir, log_dir, progress)


def launch(
    spec: StudySpec | str | Path,
    storage: str | None = None,
    *,
    n_trials: int | None = None,
    workers: int | None = None,
    checkpoint_dir: str | None = None,
    log_dir: Path | None = None,
    progress: Console | None = None,
) -> RunResult:
    """`search launch` from Python: create (or continue) the study and run it to its budget.

    Raises:
        SpecError, StudyConflictError, StorageError: as `search launch` reports them.
    """
    if not isinstance(spec, StudySpec):
        spec = load_spec(Path(spec))
    url = config.storage_url(storage, spec.storage)
    opened = open_storage(url)
    study = create_or_load_study(spec, opened, n_trials=n_trials)
    before = budget_state(study)
    return _run(study, opened, spec, url, before, workers, checkpoint_dir, log_dir, progress)


def _run(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    spec: StudySpec,
    url: str,
    before: BudgetState,
    workers: int | None,
    checkpoint_dir: str | None,
    log_dir: Path | None,
    progress: Console | None,
) -> RunResult:
    from search.launcher import Launcher, plan_workers, visible_gpus

    state = budget_state(study)
    if state.done:
        return _result(study, url, before, state, "already-done", EXIT_DONE, 0)
    reaped = reap_stale_trials(
        study,
        storage,
        grace_period=spec.workers.grace_period,
        max_retries=spec.workers.max_retries,
    )
    plans = plan_workers(workers=workers, gpus=visible_gpus())
    launcher = Launcher(
        study,
        url,
        plans,
        log_dir=log_dir or Path("search-logs") / spec.name,
        checkpoint_dir=checkpoint_dir,
    )
    try:
        with progress_display(
            study, enabled=progress is not None, console=progress or Console(stderr=True)
        ) as on_progress:
            final = launcher.run(on_progress=on_progress)
    except KeyboardInterrupt:
        return _result(
            study, url, before, budget_state(study), "interrupted", EXIT_INTERRUPTED, reaped
        )
    if final.done:
        return _result(study, url, before, final, "done", EXIT_DONE, reaped)
    result = _result(study, url, before, final, "failed", EXIT_FAILED, reaped)
    result.message = (
        f"workers stopped with {final.finished} of {final.n_trials} trials finished "
        f"(trials failed beyond the retry bound or max_failures); see the logs in "
        f"{launcher.children[0].log_path.parent}"
    )
    return result


def _result(
    study: optuna.Study,
    url: str,
    before: BudgetState,
    state: BudgetState,
    status: str,
    code: int,
    reaped: int,
) -> RunResult:
    result = RunResult(
        study=study.study_name,
        storage=mask_url(url),
        status=status,
        exit_code=code,
        n_trials=state.n_trials,
        finished_before=before.finished,
        finished=state.finished,
        complete=state.complete,
        pruned=state.pruned,
        failed=state.failed,
        running=state.running,
        waiting=state.waiting,
        reaped=reaped,
    )
    try:
        best = study.best_trial
        result.best_trial, result.best_value, result.best_params = (
            best.number,
            best.value,
            best.params,
        )
    except ValueError:
        pass
    if status == "already-done":
        result.message = (
            f"study {study.study_name!r} is already done: {state.finished} of "
            f"{state.n_trials} trials finished; nothing to resume (a larger --n-trials "
            "extends it)"
        )
    return result

