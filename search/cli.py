"""The `search` command line: launch, worker, create, status.

Exit codes: 0 success; 1 unexpected failure (a bug: rerun with --debug for the traceback);
2 bad input or an error `search` explains in one line (spec, storage, study conflict);
130 interrupted (Ctrl-C / SIGTERM) after handing running trials back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

import search
from search import config
from search.exceptions import SearchError


class _OneLineUsageError(ClickException):
    exit_code = 2


class _SearchGroup(TyperGroup):
    """The command tree; a usage error (missing argument, unknown option, bad value) is one
    plain line, `Error: ...`, exit 2, like every error `search` explains."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except NoArgsIsHelpError:
        raise  # `search` alone prints the help
    except UsageError as e:
        raise _OneLineUsageError(e.format_message()) from e


app = typer.Typer(
    name="search",
    cls=_SearchGroup,
    help="Hyperparameter search for PyTorch training with Optuna: one machine or a GPU fleet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # usage errors end in one plain `Error: ...` line, like ours
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        metavar="URL",
        help="Database URL: sqlite:///FILE or postgresql://USER:PASSWORD@HOST:PORT/DB. "
        "Default: $SEARCH_STORAGE, then the study file's `storage`, then sqlite:///search.db.",
    ),
]
CheckpointOption = Annotated[
    str | None,
    typer.Option(
        "--checkpoint-dir",
        metavar="DIR",
        help="Save a checkpoint per trial each epoch here (shared across machines) so a retried "
        "trial resumes; overrides the spec's workers.checkpoint_dir.",
    ),
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"search {search.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and debug logs.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    _state["debug"] = debug
    _configure_logging(debug)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Around a command's work: Optuna's logging set up, `SearchError` as one `Error:` line."""
    _configure_optuna_logging(_state["debug"])
    try:
        yield
    except SearchError as e:
        if _state["debug"]:
            raise
        err_console.print(f"Error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


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
    from search.launch import Launcher, check_gpus, plan_workers, visible_gpus
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
def status(
    study_name: Annotated[
        str | None,
        typer.Argument(metavar="[STUDY]", help="Study to describe; omit to list every study."),
    ] = None,
    storage: StorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Trials per state, budget, best value, trials per hour, running/stale trials, retries.

    Read-only: creates no file or table and runs no migration.
    """
    from search.status import print_status, status_rows, study_status
    from search.storage import open_storage_read_only

    with _errors():
        opened = open_storage_read_only(config.storage_url(storage))
        rows = [study_status(opened, study_name)] if study_name else status_rows(opened)
    if as_json:
        typer.echo(json.dumps(rows[0] if study_name else rows, indent=2, default=str))
        return
    print_status(rows, console, one_study=study_name is not None)


# --- Review and resume: dashboard, report, export, audit, resume --------------------------
# Read-only commands open the storage with `open_storage_read_only`: no file, table or
# migration is ever created, and a missing SQLite file is a one-line error (exit 2).


def _read_only_study(study_name: str, storage: str | None) -> Any:
    from search.status import open_study_read_only

    return open_study_read_only(study_name, config.storage_url(storage))


def _write_output(text: str, output: Path | None) -> None:
    if output is None:
        typer.echo(text, nl=not text.endswith("\n"))
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise SearchError(f"cannot write {output}: {e.strerror}") from None
    err_console.print(f"Wrote {output} ({len(text.encode()) // 1024} KiB).", highlight=False)


StudyArgument = Annotated[str, typer.Argument(metavar="STUDY", help="Name of the study.")]


@app.command()
def report(
    study_name: StudyArgument,
    storage: StorageOption = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write.")] = Path(
        "report.html"
    ),
) -> None:
    """Write one self-contained offline HTML report of STUDY (plots, best trials, compute)."""
    from search.report import build_report

    with _errors():
        _write_output(build_report(_read_only_study(study_name, storage)), output)


@app.command()
def export(
    study_name: StudyArgument,
    storage: StorageOption = None,
    fmt: Annotated[
        str, typer.Option("--format", metavar="csv|json", help="csv or json (json round-trips).")
    ] = "json",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File to write; default: stdout.")
    ] = None,
) -> None:
    """Every trial of STUDY with params, state, value, curves, attributes and reasons."""
    from search.export import to_csv, to_json

    if fmt not in ("csv", "json"):
        raise typer.BadParameter(f"expected csv or json, got {fmt!r}", param_hint="--format")
    with _errors():
        study = _read_only_study(study_name, storage)
        _write_output(to_json(study) if fmt == "json" else to_csv(study), output)


@app.command()
def audit(
    study_name: StudyArgument,
    storage: StorageOption = None,
    pruners: Annotated[
        list[str] | None,
        typer.Option(
            "--pruner",
            metavar="SPEC",
            help="A pruner setting to replay, e.g. median or default:divergence_margin=0.5; "
            "repeat for several. Default: median and default.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Replay STUDY's recorded curves through other pruner settings, beside what happened."""
    from search.audit import audit as run_audit
    from search.audit import render_audit

    with _errors():
        study = _read_only_study(study_name, storage)
        results = run_audit(study, pruners or ["median", "default"])
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    console.print(render_audit(study_name, results))


@app.command()
def dashboard(
    study_name: Annotated[
        str | None, typer.Argument(metavar="[STUDY]", help="Study to open first.")
    ] = None,
    storage: StorageOption = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; loopback unless told otherwise.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port; 0 picks a free one.")
    ] = 8080,
    allow_writes: Annotated[
        bool,
        typer.Option(
            "--allow-writes",
            help="Let the dashboard change the study (notes, tell, delete) and push the "
            "service's plots into it. Default: read-only (GET/HEAD only, read-only database).",
        ),
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="SEARCH_DASHBOARD_TOKEN",
            show_envvar=True,
            help="Access token every request must carry (Bearer header, or ?token= once).",
        ),
    ] = None,
) -> None:
    """Serve optuna-dashboard on the study storage, read-only by default."""
    import optuna

    from search.dashboard import dashboard_app, is_loopback, make_dashboard_server, push_plots
    from search.storage import mask_url, open_storage, open_storage_read_only

    with _errors():
        url = config.storage_url(storage)
        opened = open_storage(url) if allow_writes else open_storage_read_only(url)
        path = "/dashboard"
        if study_name is not None:
            if study_name not in {s.study_name for s in optuna.get_all_study_summaries(opened)}:
                raise SearchError(f"no study {study_name!r} in {mask_url(url)}")
            path += f"/studies/{opened.get_study_id_from_name(study_name)}"
            if allow_writes:
                push_plots(optuna.load_study(study_name=study_name, storage=opened))
        if not is_loopback(host) and token is None:
            err_console.print(
                f"Warning: serving on {host} without --token: anyone who reaches it can read "
                "the study.",
                highlight=False,
            )
        try:
            server = make_dashboard_server(
                dashboard_app(opened, allow_writes=allow_writes, token=token), host, port
            )
        except OSError as e:
            raise SearchError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    mode = "read-write" if allow_writes else "read-only"
    query = "?token=…" if token else ""
    typer.echo(
        f"Dashboard ({mode}) of {mask_url(url)} on http://{host}:{server.server_port}{path}{query}"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


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


def _configure_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=err_console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def _configure_optuna_logging(debug: bool) -> None:
    import optuna  # here, not at start-up: help and usage errors do not need it

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def main() -> None:
    """Console entry point."""
    app()
