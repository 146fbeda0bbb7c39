"""The `search` command tree's shared parts: the app, common options, one-line errors, logs.

`search.cli` holds the commands that run studies, `search.cli_review` those that read them;
both register on `app` here. Exit codes: 0 success; 1 unexpected failure (a bug: rerun with
--debug for the traceback); 2 bad input or an error `search` explains in one line (spec,
storage, study conflict); 130 interrupted (Ctrl-C / SIGTERM) after handing trials back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

import search
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
StudyArgument = Annotated[str, typer.Argument(metavar="STUDY", help="Name of the study.")]
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
