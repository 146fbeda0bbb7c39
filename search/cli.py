"""The `search` command line: the commands that run studies (launch, worker, create, resume).

The app, its options and error handling are in `search.cli_base`; the commands that review
a study (status, report, export, audit, dashboard) in `search.cli_review`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from search import config
from search.cli_base import (
    CheckpointOption,
    StorageOption,
    StudyArgument,
    _errors,
    _state,
    app,
    console,
    err_console,
)
from search.exceptions import SearchError


@app.command()
def launch(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study file (YAML).")],
    storage: StorageOption = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials",
            min=1,
            help="Finished trials (complete + pruned) to reach; default: the spec's n_trials.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Worker processes on this machine. Default: one per visible "
            "GPU, else half the CPU cores.",
        ),
    ] = None,
    workers_per_gpu: Annotated[
        int, typer.Option("--workers-per-gpu", min=1, help="Workers sharing each GPU.")
    ] = 1,
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            metavar="IDS",
            help="Comma-separated GPU ids to use, e.g. 0,2. Default: all visible GPUs.",
        ),
    ] = None,
    checkpoint_dir: CheckpointOption = None,
    log_dir: Annotated[
        Path | None,
        typer.Option("--log-dir", help="Per-worker logs. Default: search-logs/<study>."),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show the live progress bar.")
    ] = True,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run the workers as actors on a Ray cluster instead of this machine: one per "
            "cluster GPU (or per 2 CPUs without GPUs; --workers caps them). ADDRESS: auto (the "
            "cluster this node belongs to), HOST:PORT, ray://HOST:PORT, or local to start one "
            "here. Needs the [ray] extra.",
        ),
    ] = None,
) -> None:
    """Create the study (or continue it) and run workers on this machine until it is done."""
    from search.ending import check_result
    from search.launcher import Launcher, check_gpus, plan_workers, visible_gpus
    from search.progress import best_summary, progress_display
    from search.spec import load_spec
    from search.storage import mask_url, open_storage
    from search.study import create_or_update_study

    with _errors():
        available = visible_gpus()
        gpu_ids = check_gpus(gpus, available) if gpus else available
        spec = load_spec(spec_path)
        url = config.storage_url(storage, spec.storage)
        if ray_address is not None:
            from search import ray_engine

            ray_engine.connect(ray_address)  # fails with the install hint before the database
        update = create_or_update_study(spec, open_storage(url), n_trials=n_trials)
        study = update.study
        err_console.print(update.describe(), markup=False, highlight=False, soft_wrap=True)
        if ray_address is not None:
            try:
                with progress_display(study, enabled=progress, console=err_console) as show:
                    final = ray_engine.launch(
                        study,
                        url,
                        workers_per_gpu=workers_per_gpu,
                        max_workers=workers,
                        checkpoint_dir=checkpoint_dir,
                        on_progress=show,
                    )
            except KeyboardInterrupt:
                err_console.print("Interrupted: actors stopped, running trials handed back.")
                raise typer.Exit(130) from None
            console.print(best_summary(study, final))
            if not final.done:
                raise SearchError(
                    f"Ray workers stopped with {final.finished} of {final.n_trials} trials "
                    "finished; see their logs above"
                )
            check_result(study)
            return
        plans = plan_workers(workers=workers, gpus=gpu_ids, workers_per_gpu=workers_per_gpu)
        err_console.print(
            f"Study [bold]{spec.name}[/] in {mask_url(url)}: "
            f"{len(plans)} worker(s) on {plans[0].device}"
            + (
                f" (GPUs {','.join(p.env['CUDA_VISIBLE_DEVICES'] for p in plans)})"
                if gpu_ids
                else ""
            ),
            highlight=False,
            soft_wrap=True,
        )
        launcher = Launcher(
            study,
            url,
            plans,
            log_dir=log_dir or Path("search-logs") / spec.name,
            checkpoint_dir=config.checkpoint_dir(checkpoint_dir, spec.workers.checkpoint_dir),
            debug=_state["debug"],
        )
        try:
            with progress_display(study, enabled=progress, console=err_console) as on_progress:
                final = launcher.run(on_progress=on_progress)
        except KeyboardInterrupt:
            err_console.print("Interrupted: workers stopped, running trials handed back.")
            raise typer.Exit(130) from None
        console.print(best_summary(study, final))
        if final.done:
            check_result(study)
        else:
            raise SearchError(launcher.failure_summary(final))


@app.command()
def worker(
    study_name: Annotated[str, typer.Argument(metavar="STUDY", help="Name of an existing study.")],
    storage: StorageOption = None,
    device: Annotated[
        str, typer.Option("--device", help="Where to train: cpu or cuda:N.")
    ] = "cpu",
    worker_id: Annotated[
        str | None,
        typer.Option(
            "--worker-id",
            help="Name recorded on each trial; seeds this worker's sampler. "
            "Default: <host>-<pid>.",
        ),
    ] = None,
    checkpoint_dir: CheckpointOption = None,
    stop_timeout: Annotated[
        float,
        typer.Option(
            "--stop-timeout",
            min=1,
            help="Seconds to wait for an epoch boundary after SIGTERM "
            "before handing the trial back and exiting (a second signal: at once; "
            "`search launch` kills a worker 10 s after this).",
        ),
    ] = 50.0,
) -> None:
    """Pull trials of STUDY from the database and train them until the budget is met."""
    from search.watchdog import EXIT_RECYCLE, run_worker

    if device != "cpu" and not device.startswith("cuda"):
        raise typer.BadParameter(f"expected cpu or cuda:N, got {device!r}", param_hint="--device")
    with _errors():
        result = run_worker(
            study_name,
            config.storage_url(storage),
            device=device,
            worker_id=worker_id,
            checkpoint_dir=checkpoint_dir,
            stop_timeout=stop_timeout,
        )
    logging.getLogger(__name__).info(
        "Worker done: %d finished, %d failed%s.",
        result.finished,
        result.failed,
        " (stopped by signal)" if result.preempted else "",
    )
    if result.recycle:
        raise typer.Exit(EXIT_RECYCLE)


@app.command()
def create(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study file (YAML).")],
    storage: StorageOption = None,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", min=1, help="Override the spec's budget.")
    ] = None,
) -> None:
    """Create the study (or check the existing one matches) without running trials."""
    from search.spec import load_spec
    from search.storage import mask_url, open_storage
    from search.study import create_or_update_study

    with _errors():
        spec = load_spec(spec_path)
        url = config.storage_url(storage, spec.storage)
        update = create_or_update_study(spec, open_storage(url), n_trials=n_trials)
        study = update.study
        typer.echo(update.describe())
        typer.echo(
            f"Study {study.study_name} ready in {mask_url(url)} "
            f"(budget {study.user_attrs['n_trials']} trials)."
        )


@app.command()
def resume(
    study_name: StudyArgument,
    storage: StorageOption = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials",
            min=1,
            metavar="TOTAL",
            help="Total finished trials to reach; larger than the budget extends the study.",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Worker processes on this machine.")
    ] = None,
    checkpoint_dir: CheckpointOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Continue STUDY from the database alone (its stored spec) until its total.

    Exit codes: 0 done (or already done), 1 trials failed beyond the retry bound,
    2 bad input, 3 interrupted.
    """
    from search.resumption import resume as run_resume

    with _errors():
        result = run_resume(
            study_name,
            storage,
            n_trials=n_trials,
            workers=workers,
            checkpoint_dir=checkpoint_dir,
            progress=None if as_json else err_console,
        )
    typer.echo(json.dumps(result.as_dict(), indent=2, default=str) if as_json else str(result))
    raise typer.Exit(result.exit_code)


from search import cli_review  # noqa: E402, F401  (registers the review commands)


def main() -> None:
    """Console entry point."""
    app()
