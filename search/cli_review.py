"""The commands that review a study: status, report, export, audit, dashboard.

Read-only commands open the storage with `open_storage_read_only`: no file, table or
migration is ever created, and a missing SQLite file is a one-line error (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from search import config
from search.cli_base import StorageOption, StudyArgument, _errors, app, console, err_console
from search.exceptions import SearchError


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
