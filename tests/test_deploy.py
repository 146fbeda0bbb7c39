"""Deployment files against the real CLI and tools: compose, Dockerfile, Slurm, Kubernetes, docs.

Every `search ...` and `optuna-dashboard ...` they run is parsed against the real command tree
(`typer.main.get_command(app)`) or the real `optuna-dashboard --help`, so renaming a command or
an option fails here. No GPU, Docker engine, Slurm or Kubernetes cluster runs in these tests:
the GPU smoke script is run only up to its "no GPU" exit, with a stand-in `nvidia-smi`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from search.cli import app
from search.storage import POOL_OVERFLOW, POOL_SIZE

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SLURM = REPO / "deploy" / "slurm" / "search-workers.sbatch"
K8S_WORKERS = REPO / "deploy" / "k8s" / "search-workers.yaml"
K8S_CREATE = REPO / "deploy" / "k8s" / "search-create.yaml"
SMOKE = REPO / "scripts" / "gpu_smoke.sh"
DOCS = REPO / "docs" / "deployment.md"
SHELL_SCRIPTS = [SLURM, SMOKE]


# --- what a command line may say -----------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """A command's options (name -> takes a value) and how many positional arguments it takes."""

    name: str
    options: dict[str, bool]
    min_args: int
    max_args: float


def _click_usage(command: Any, name: str) -> Usage:
    """The usage of a click command (typer ships its own copy of click: duck-typed here)."""
    options = {"--help": False}
    min_args, max_args = 0, 0.0
    for param in command.params:
        if param.param_type_name == "option":
            takes_value = not (param.is_flag or param.count)
            options.update({opt: takes_value for opt in (*param.opts, *param.secondary_opts)})
        elif param.param_type_name == "argument":
            max_args += param.nargs if param.nargs >= 0 else math.inf
            min_args += max(param.nargs, 1) if param.required else 0
    return Usage(name, options, min_args, max_args)


@functools.cache
def _search_group() -> Any:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands"), "search is no longer a group of subcommands"
    return group


@functools.cache
def _dashboard_usage() -> Usage:
    """optuna-dashboard's options and positionals, read from its real `--help`."""
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    exe = exe or shutil.which("optuna-dashboard")
    assert exe, "optuna-dashboard is not installed (it is a dependency of the project)"
    text = subprocess.run(
        [exe, "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    usage_block = text.split("\n\n")[0].replace("\n", " ")
    options = {m[1]: bool(m[2]) for m in re.finditer(r"\[(-[-\w]+)(?: ([^\]]+))?\]", usage_block)}
    for line in text.splitlines():  # aliases listed together in the options section: --version, -v
        names = re.match(r"\s+(-[-\w]+(?:, -[-\w]+)+)", line)
        if names:
            aliases = names[1].split(", ")
            takes_value = any(options.get(a, False) for a in aliases)
            options.update({a: takes_value for a in aliases})
    optional = re.findall(r"\[([a-z][\w-]*)\]", usage_block)
    required = re.sub(r"\[[^\]]*\]", " ", usage_block).split()[2:]  # after "usage: PROG"
    return Usage("optuna-dashboard", options, len(required), len(required) + len(optional))


def _check_args(usage: Usage, args: list[str]) -> list[str]:
    """Assert `args` parse under `usage`; return the positional arguments."""
    positionals: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("-") and token != "-":
            name, has_value, _ = token.partition("=")
            assert name in usage.options, (
                f"`{usage.name}` has no option {name} in {args}; it has {sorted(usage.options)}"
            )
            if usage.options[name] and not has_value:
                assert i + 1 < len(args), f"`{usage.name} {name}` needs a value in {args}"
                i += 1
            assert usage.options[name] or not has_value, f"{name} is a flag, in {args}"
        else:
            positionals.append(token)
        i += 1
    assert usage.min_args <= len(positionals) <= usage.max_args, (
        f"`{usage.name}` takes {usage.min_args} to {usage.max_args} arguments, "
        f"got {positionals} in {args}"
    )
    return positionals


def check_search(args: list[str]) -> tuple[str, list[str]]:
    """Assert `search ARGS` names a real subcommand with real options; return it and its args."""
    group = _search_group()
    top = _click_usage(group, "search")
    i = 0
    while i < len(args) and args[i].startswith("-"):
        assert args[i] in top.options and not top.options[args[i]], f"search {args[i]}?"
        i += 1
    if i == len(args):
        assert "--help" in args, f"`search {shlex.join(args)}` names no command"
        return "--help", []
    name = args[i]
    command = group.commands.get(name)
    assert command is not None, (
        f"`search {name}` is no command; there are {sorted(group.commands)}"
    )
    return name, _check_args(_click_usage(command, f"search {name}"), args[i + 1 :])


def _option_value(args: list[str], option: str) -> str | None:
    for i, token in enumerate(args):
        if token == option and i + 1 < len(args):
            return args[i + 1]
        if token.startswith(option + "="):
            return token.split("=", 1)[1]
    return None


# --- finding command lines in shell text, compose and manifests ----------------------------

_COMMAND_START = re.compile(
    r"(?:^|[;&|(!]|\$\(|\b(?:exec|then|do|else|time)\s|\btimeout\s+(?:-\S+\s+)*\S+\s)"
    r"\s*(?:\w+=\S*\s+)*(?P<program>search|optuna-dashboard)\s"
)
_OPERATORS = set("();<>|&")


def _logical_lines(text: str) -> Iterator[str]:
    """Lines with continuations joined and here-document bodies left out; comments uncommented
    (a command shown in a comment must be right too)."""
    lines = iter(text.replace("\\\n", " ").splitlines())
    for line in lines:
        heredoc = re.search(r"(?<!<)<<-?\s*['\"]?(\w+)", line)  # not a <<< here-string
        if heredoc:
            for body in lines:
                if body.strip() == heredoc[1]:
                    break
        stripped = line.strip()
        yield stripped.lstrip("#").strip() if stripped.startswith("#") else line


def shell_calls(text: str, program: str) -> list[list[str]]:
    """The argument lists of every `program ...` command in shell text."""
    calls = []
    for line in _logical_lines(text):
        for match in _COMMAND_START.finditer(line):
            if match["program"] != program:
                continue
            lexer = shlex.shlex(line[match.end() :], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            args = []
            for token in lexer:
                if set(token) <= _OPERATORS:
                    break
                args.append(token)
            calls.append(args)
    return calls


def compose_interpolate(value: str) -> str:
    """Compose's variable substitution with every variable unset: defaults, `$$` -> `$`."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        if match[2] == ":-" or match[2] == "-":
            return match[3]
        return f"<{match[1]}>"

    return re.sub(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}", replace, value)


@functools.cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def _image_entrypoint() -> list[str]:
    (entrypoint,) = [json.loads(v) for k, v in _dockerfile_instructions() if k == "ENTRYPOINT"]
    return list(entrypoint)


def _service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: compose_interpolate(str(v)) for k, v in env.items()}


def compose_calls(service_name: str) -> list[tuple[str, list[str]]]:
    """(program, args) of what a compose service runs, with the container's variables filled."""
    service = _compose()["services"][service_name]
    entrypoint = service.get("entrypoint", _image_entrypoint())
    command = service.get("command") or []
    argv = [
        compose_interpolate(str(a))
        for a in [
            *(shlex.split(entrypoint) if isinstance(entrypoint, str) else entrypoint),
            *(shlex.split(command) if isinstance(command, str) else command),
        ]
    ]
    env = _service_env(service)

    def fill(arg: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), arg)

    if argv[:2] in (["/bin/sh", "-c"], ["sh", "-c"]):
        return [
            (program, [fill(a) for a in args])
            for program in ("search", "optuna-dashboard")
            for args in shell_calls(argv[2], program)
        ]
    return [(Path(argv[0]).name, [fill(a) for a in argv[1:]])]


def _k8s_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s_jobs() -> dict[str, dict[str, Any]]:
    docs = _k8s_documents(K8S_CREATE) + _k8s_documents(K8S_WORKERS)
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}


def _spec_name(spec_path: str) -> str:
    path = REPO / spec_path
    assert path.is_file(), f"study file {spec_path} does not exist"
    return str(yaml.safe_load(path.read_text())["name"])


def _seconds(duration: str | int) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    if isinstance(duration, int):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"unreadable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)
    elif isinstance(node, str):
        yield key, node


# --- the CLI checker itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["worker", "s", "--device-id", "0"],
        ["launch", "a.yaml", "b.yaml"],
        ["workers", "s"],
        ["worker"],
        ["status", "s", "--json=yes"],
    ],
)
def test_checker_rejects_what_the_cli_would_reject(args: list[str]) -> None:
    """The checker is strict enough to catch a renamed option, a wrong count or a wrong command."""
    with pytest.raises(AssertionError):
        check_search(args)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Error" in result.output, result.output


def test_shell_calls_find_commands_but_not_prose() -> None:
    text = (
        'x=$(search status "$s" --json)\n'
        "timeout --signal=INT 5 search launch a.yaml --no-progress || rc=$?\n"
        'echo "no search command on PATH"\n'
        "A=1 search create b.yaml  # comment\n"
    )
    assert shell_calls(text, "search") == [
        ["status", "$s", "--json"],
        ["launch", "a.yaml", "--no-progress"],
        ["create", "b.yaml"],
    ]


# --- docker-compose.yml --------------------------------------------------------------------


def test_compose_runs_real_search_and_dashboard_commands() -> None:
    services = _compose()["services"]
    seen: dict[str, list[list[str]]] = {}
    for name in services:
        if name == "postgres":
            continue
        for program, args in compose_calls(name):
            if program == "search":
                seen.setdefault(check_search(args)[0], []).append(args)
            else:
                assert program == "optuna-dashboard", f"service {name} runs {program}"
                positionals = _check_args(_dashboard_usage(), args)
                assert len(positionals) == 1, f"the dashboard is given no storage URL: {args}"
                seen.setdefault("dashboard", []).append(args)
    assert set(seen) == {"create", "worker", "dashboard"}, seen


def test_compose_worker_trains_the_study_that_create_makes() -> None:
    ((_, create_args),) = compose_calls("create")
    ((_, worker_args),) = compose_calls("worker")
    _, (spec_path,) = check_search(create_args)
    _, (study,) = check_search(worker_args)
    assert study == _spec_name(spec_path)
    assert _option_value(worker_args, "--device") == "cuda:0"


def test_compose_postgres_is_healthchecked_and_keeps_its_data_in_a_volume() -> None:
    compose = _compose()
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    data_mounts = [v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data")]
    assert data_mounts and data_mounts[0].split(":")[0] in compose["volumes"]


def test_compose_named_volumes_are_declared() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source}"


def test_compose_startup_order_postgres_then_create_then_workers() -> None:
    services = _compose()["services"]
    assert services["create"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (
        services["worker"]["depends_on"]["create"]["condition"] == "service_completed_successfully"
    )
    assert services["create"].get("restart", "no") == "no"


def test_compose_workers_reserve_nvidia_gpus_and_restart_after_crashes() -> None:
    worker = _compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    # `count: 1` would hand GPU 0 to every replica (docker/compose#11863); each replica
    # reserves all GPUs and claims one through a lock file instead.
    assert device["count"] == "all"
    assert worker["restart"] == "on-failure"


def test_compose_worker_checkpoints_to_a_shared_volume() -> None:
    worker = _compose()["services"]["worker"]
    ((_, args),) = compose_calls("worker")
    checkpoint_dir = _option_value(args, "--checkpoint-dir")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert checkpoint_dir in mounts
    assert mounts[checkpoint_dir] in _compose()["volumes"]


def test_compose_stop_waits_longer_than_the_worker_stop_timeout() -> None:
    worker = _compose()["services"]["worker"]
    ((_, args),) = compose_calls("worker")
    stop_timeout = float(_option_value(args, "--stop-timeout") or 120)
    assert _seconds(worker["stop_grace_period"]) > stop_timeout


def test_compose_dashboard_is_opt_in_and_on_loopback_only() -> None:
    dashboard = _compose()["services"]["dashboard"]
    assert "dashboard" in dashboard["profiles"]
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            host_ip = compose_interpolate(str(port)).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback by default"


def test_compose_passes_the_storage_url_as_search_storage() -> None:
    services = _compose()["services"]
    for name in ("create", "worker", "dashboard"):
        url = _service_env(services[name])["SEARCH_STORAGE"]
        # psycopg2 named: optuna-dashboard on SQLAlchemy 2.1 would pick psycopg 3 for postgresql://
        assert url.startswith("postgresql+psycopg2://"), name
        assert "@postgres:" in url, f"{name} does not default to the compose PostgreSQL"


def test_compose_holds_no_literal_password() -> None:
    reference = r"\$\{\w+(?::?\?[^}]*)?\}"  # ${VAR} or ${VAR:?message}, never ${VAR:-default}
    for key, value in _strings(_compose()):
        if re.search(r"password|secret|token", key, re.IGNORECASE):
            assert re.fullmatch(reference, value), f"{key}: {value!r} is not a ${{VAR}} reference"
        for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value):
            assert re.fullmatch(reference, password), f"{key}: password {password!r} in a URL"


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_accepts_the_file() -> None:
    """`docker compose config` validates without an engine; needs the compose CLI installed."""
    cli = _compose_cli()
    if cli is None:
        pytest.fail("no docker compose / docker-compose CLI: apt-get install docker-compose")
    env = {**os.environ, "POSTGRES_PASSWORD": "not-a-real-password"}
    for args in (["config", "-q"], ["--profile", "dashboard", "config", "-q"]):
        result = subprocess.run(
            [*cli, "-f", str(COMPOSE), *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 0, result.stderr
    unset = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    refused = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=unset
    )
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stdout + refused.stderr


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_installs_the_project_with_search_as_entrypoint() -> None:
    instructions = _dockerfile_instructions()
    base = next(v for k, v in instructions if k == "FROM")
    assert base.startswith(("python:3.11-slim", "nvidia/cuda")), base
    assert _image_entrypoint() == ["search"]
    runs = [v for k, v in instructions if k == "RUN"]
    assert any(re.search(r"\bpip install\b.*\s\.(\s|$)", run) for run in runs), runs
    (cmd,) = [json.loads(v) for k, v in instructions if k == "CMD"]
    check_search(cmd)


def test_dockerfile_copies_existing_paths_including_studies_and_examples() -> None:
    destinations = []
    for kind, value in _dockerfile_instructions():
        if kind != "COPY":
            continue
        *sources, destination = value.split()
        destinations.append(destination)
        for source in sources:
            if "*" not in source:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert {"./studies", "./examples", "./search"} <= set(destinations)


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".git", ".venv", "*.db"} <= ignored
    for path in ("search", "studies", "examples", "pyproject.toml"):
        assert path not in ignored


# --- Slurm ---------------------------------------------------------------------------------


def _sbatch_directives() -> list[str]:
    directives = []
    for line in SLURM.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break  # sbatch reads #SBATCH lines only before the first command
        if line.startswith("#SBATCH"):
            directives.append(line.split(None, 1)[1])
    return directives


def test_slurm_is_a_job_array_with_one_gpu_per_task() -> None:
    directives = _sbatch_directives()
    assert any(d.startswith("--array=") for d in directives), directives
    assert "--gres=gpu:1" in directives


def test_slurm_task_execs_a_real_worker_on_cuda0() -> None:
    calls = shell_calls(SLURM.read_text(), "search")
    workers = [args for args in calls if check_search(args)[0] == "worker"]
    assert workers, calls
    args = workers[-1]
    assert _option_value(args, "--device") == "cuda:0"
    assert _option_value(args, "--checkpoint-dir")
    assert re.search(r"^exec search worker ", SLURM.read_text(), re.MULTILINE)


def test_slurm_signal_comes_before_the_worker_stop_timeout_runs_out() -> None:
    text = SLURM.read_text()
    (lead,) = [int(d.rsplit("@", 1)[1]) for d in _sbatch_directives() if d.startswith("--signal")]
    default = re.search(r"STOP_TIMEOUT:-(\d+)", text)
    assert default, "the script sets no default STOP_TIMEOUT"
    assert lead > int(default[1])


def test_slurm_takes_the_storage_url_from_the_environment_never_inline() -> None:
    text = SLURM.read_text()
    assert "SEARCH_STORAGE" in text
    assert not re.search(r"://[^\s:/@]+:[^\s@]+@", text), "a password in the script"
    for args in shell_calls(text, "search"):
        if check_search(args)[0] == "worker":
            assert _option_value(args, "--storage") is None


# --- Kubernetes ----------------------------------------------------------------------------


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _container_call(container: dict[str, Any]) -> list[str]:
    argv = [*container.get("command", _image_entrypoint()), *container.get("args", [])]
    assert argv[0] == "search", argv
    return [str(a) for a in argv[1:]]


def test_k8s_jobs_run_real_commands_and_work_on_the_created_study() -> None:
    jobs = _k8s_jobs()
    create_cmd, (spec_path,) = check_search(_container_call(_container(jobs["search-create"])))
    worker_args = _container_call(_container(jobs["search-workers"]))
    worker_cmd, (study,) = check_search(worker_args)
    assert (create_cmd, worker_cmd) == ("create", "worker")
    assert study == _spec_name(spec_path)
    assert _option_value(worker_args, "--device") == "cuda:0"


def test_k8s_workers_take_one_gpu_each_and_restart_on_failure() -> None:
    job = _k8s_jobs()["search-workers"]
    spec = job["spec"]
    assert spec["parallelism"] >= 1 and spec["completions"] == spec["parallelism"]
    assert spec["backoffLimit"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_grace_period_exceeds_the_worker_stop_timeout() -> None:
    job = _k8s_jobs()["search-workers"]
    args = _container_call(_container(job))
    stop_timeout = float(_option_value(args, "--stop-timeout") or 120)
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > stop_timeout


def test_k8s_checkpoint_dir_is_a_shared_volume() -> None:
    docs = _k8s_documents(K8S_WORKERS)
    job = _k8s_jobs()["search-workers"]
    container = _container(job)
    checkpoint_dir = _option_value(_container_call(container), "--checkpoint-dir")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == checkpoint_dir]
    (volume,) = [
        v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    claim = volume["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


@pytest.mark.parametrize("job_name", ["search-create", "search-workers"])
def test_k8s_storage_url_comes_from_a_secret(job_name: str) -> None:
    container = _container(_k8s_jobs()[job_name])
    (storage,) = [e for e in container["env"] if e["name"] == "SEARCH_STORAGE"]
    assert "value" not in storage
    assert {"name", "key"} <= set(storage["valueFrom"]["secretKeyRef"])
    for _, value in _strings(container):
        assert "://" not in value, f"a URL written into the manifest: {value}"


# --- GPU smoke script ----------------------------------------------------------------------


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(path: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_smoke_script_runs_real_commands() -> None:
    calls = {check_search(args)[0]: args for args in shell_calls(SMOKE.read_text(), "search")}
    launch, status = calls["launch"], calls["status"]
    assert _option_value(launch, "--workers-per-gpu") is not None
    assert "--no-progress" in launch
    assert _option_value(launch, "--storage") == _option_value(status, "--storage")
    assert "--json" in status


def test_status_json_has_the_fields_the_smoke_script_reads(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'smoke.db'}"
    runner = CliRunner()
    created = runner.invoke(app, ["create", "studies/digits_mlp.yaml", "--storage", storage])
    assert created.exit_code == 0, created.output
    shown = runner.invoke(
        app, ["status", _spec_name("studies/digits_mlp.yaml"), "--storage", storage, "--json"]
    )
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    used = re.findall(r"(?:counts|data)\[\"(\w+)\"\]", SMOKE.read_text())
    assert used, "the smoke script reads no status field"
    for key in used:
        assert key in data or key in data["counts"], f"status --json has no {key!r}"


def test_smoke_script_help() -> None:
    result = subprocess.run(["bash", str(SMOKE), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: scripts/gpu_smoke.sh")


@pytest.mark.parametrize(
    ("fake_nvidia_smi", "message"),
    [
        (
            "echo 'NVIDIA-SMI has failed: cannot communicate with the driver'; exit 9",
            "nvidia-smi failed",
        ),
        ("exit 0", "lists no GPU"),
    ],
    ids=["driver-broken", "no-gpu-listed"],
)
def test_smoke_script_fails_fast_without_a_gpu(
    tmp_path: Path, fake_nvidia_smi: str, message: str
) -> None:
    """A stand-in nvidia-smi (the GPU is what this machine lacks); nothing gets installed."""
    bin_dir, scratch = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    scratch.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n{fake_nvidia_smi}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(scratch)}
    result = subprocess.run(
        ["bash", str(SMOKE)], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert not any(scratch.iterdir()), "the script made a temporary folder before the GPU check"


# --- docs ----------------------------------------------------------------------------------


def _doc_code() -> str:
    return "\n".join(re.findall(r"```(?:bash|sh)\n(.*?)```", DOCS.read_text(), re.DOTALL))


def test_docs_commands_exist() -> None:
    code = _doc_code()
    search_calls = shell_calls(code, "search")
    assert {check_search(args)[0] for args in search_calls} >= {"launch", "create", "worker"}
    for args in shell_calls(code, "optuna-dashboard"):
        assert len(_check_args(_dashboard_usage(), args)) == 1


def test_docs_name_files_that_exist() -> None:
    for path in set(re.findall(r"\b(?:deploy|scripts|studies)/[\w./-]*\w", DOCS.read_text())):
        assert (REPO / path).exists(), f"docs/deployment.md names {path}, which does not exist"


def test_docs_connection_count_matches_the_pool() -> None:
    assert f"at most **{POOL_SIZE + POOL_OVERFLOW}**" in DOCS.read_text()
    assert f"`{POOL_SIZE + POOL_OVERFLOW} × N`" in DOCS.read_text()
