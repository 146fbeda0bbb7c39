"""Deployment files against the real CLI and tools: compose, Dockerfile, Slurm, Kubernetes, docs.

Every `search ...` and `optuna-dashboard ...` they run is parsed against the real command tree
(`typer.main.get_command(app)`) or the real `optuna-dashboard --help`, so renaming a command or
an option fails here. No GPU, Docker engine, Slurm or Kubernetes cluster runs in these tests:
the GPU smoke script is run only up to its "no GPU" exit, with a stand-in `nvidia-smi`; compose
files are checked against the Compose specification's schema (tests/deploy_harness.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from deploy_harness import (
    DOCKERIGNORE,
    DOCS,
    K8S_WORKERS,
    REPO,
    SHELL_SCRIPTS,
    SLURM,
    SMOKE,
    ComposeVariableError,
    check_args,
    check_search,
    compose_calls,
    compose_config,
    compose_data,
    compose_interpolate,
    compose_schema_errors,
    container_call,
    dashboard_usage,
    doc_code,
    dockerfile_instructions,
    duration_seconds,
    image_entrypoint,
    job_container,
    k8s_documents,
    k8s_jobs,
    option_value,
    sbatch_directives,
    service_env,
    shell_calls,
    shellcheck,
    spec_name,
    strings,
)
from typer.testing import CliRunner

from search.cli import app
from search.storage import POOL_OVERFLOW, POOL_SIZE

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
    services = compose_data()["services"]
    seen: dict[str, list[list[str]]] = {}
    for name in services:
        if name == "postgres":
            continue
        for program, args in compose_calls(name):
            if program == "search":
                seen.setdefault(check_search(args)[0], []).append(args)
            else:
                assert program == "optuna-dashboard", f"service {name} runs {program}"
                positionals = check_args(dashboard_usage(), args)
                assert len(positionals) == 1, f"the dashboard is given no storage URL: {args}"
                seen.setdefault("dashboard", []).append(args)
    assert set(seen) == {"create", "worker", "dashboard"}, seen


def test_compose_worker_trains_the_study_that_create_makes() -> None:
    ((_, create_args),) = compose_calls("create")
    ((_, worker_args),) = compose_calls("worker")
    _, (spec_path,) = check_search(create_args)
    _, (study,) = check_search(worker_args)
    assert study == spec_name(spec_path)
    assert option_value(worker_args, "--device") == "cuda:0"


def test_compose_postgres_is_healthchecked_and_keeps_its_data_in_a_volume() -> None:
    compose = compose_data()
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    data_mounts = [v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data")]
    assert data_mounts and data_mounts[0].split(":")[0] in compose["volumes"]


def test_compose_named_volumes_are_declared() -> None:
    compose = compose_data()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source}"


def test_compose_startup_order_postgres_then_create_then_workers() -> None:
    services = compose_data()["services"]
    assert services["create"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (
        services["worker"]["depends_on"]["create"]["condition"] == "service_completed_successfully"
    )
    assert services["create"].get("restart", "no") == "no"


def test_compose_workers_reserve_nvidia_gpus_and_restart_after_crashes() -> None:
    worker = compose_data()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    # `count: 1` would hand GPU 0 to every replica (docker/compose#11863); each replica
    # reserves all GPUs and claims one through a lock file instead.
    assert device["count"] == "all"
    assert worker["restart"] == "on-failure"


def test_compose_worker_checkpoints_to_a_shared_volume() -> None:
    worker = compose_data()["services"]["worker"]
    ((_, args),) = compose_calls("worker")
    checkpoint_dir = option_value(args, "--checkpoint-dir")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert checkpoint_dir in mounts
    assert mounts[checkpoint_dir] in compose_data()["volumes"]


def test_compose_stop_waits_longer_than_the_worker_stop_timeout() -> None:
    worker = compose_data()["services"]["worker"]
    ((_, args),) = compose_calls("worker")
    stop_timeout = float(option_value(args, "--stop-timeout") or 120)
    assert duration_seconds(worker["stop_grace_period"]) > stop_timeout


def test_compose_dashboard_is_opt_in_and_on_loopback_only() -> None:
    dashboard = compose_data()["services"]["dashboard"]
    assert "dashboard" in dashboard["profiles"]
    for name, service in compose_data()["services"].items():
        for port in service.get("ports", []):
            host_ip = compose_interpolate(str(port)).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback by default"


def test_compose_passes_the_storage_url_as_search_storage() -> None:
    services = compose_data()["services"]
    for name in ("create", "worker", "dashboard"):
        url = service_env(services[name])["SEARCH_STORAGE"]
        # psycopg2 named: optuna-dashboard on SQLAlchemy 2.1 would pick psycopg 3 for postgresql://
        assert url.startswith("postgresql+psycopg2://"), name
        assert "@postgres:" in url, f"{name} does not default to the compose PostgreSQL"


def test_compose_holds_no_literal_password() -> None:
    reference = r"\$\{\w+(?::?\?[^}]*)?\}"  # ${VAR} or ${VAR:?message}, never ${VAR:-default}
    for key, value in strings(compose_data()):
        if re.search(r"password|secret|token", key, re.IGNORECASE):
            assert re.fullmatch(reference, value), f"{key}: {value!r} is not a ${{VAR}} reference"
        for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value):
            assert re.fullmatch(reference, password), f"{key}: password {password!r} in a URL"


PASSWORD_SET = {"POSTGRES_PASSWORD": "not-a-real-password"}


def test_compose_file_is_valid_under_the_compose_specification() -> None:
    """What `docker compose config -q` checks, offline: interpolation, then the schema; the
    opt-in `dashboard` profile's service is in the file, so it is validated too."""
    config = compose_config(PASSWORD_SET)
    assert "dashboard" in config["services"]
    assert compose_schema_errors(config) == []
    assert "not-a-real-password@postgres:5432/search" in config["services"]["worker"][
        "environment"]["SEARCH_STORAGE"]


def test_compose_refuses_to_start_without_postgres_password() -> None:
    with pytest.raises(ComposeVariableError, match="POSTGRES_PASSWORD"):
        compose_config({})
    with pytest.raises(ComposeVariableError, match="POSTGRES_PASSWORD"):
        compose_config({"POSTGRES_PASSWORD": ""})  # `:?` refuses an empty value too


@pytest.mark.parametrize(
    ("service", "key", "value"),
    [
        ("worker", "stop_grace_prd", "150s"),  # a misspelt key
        ("worker", "stop_grace_period", "150 seconds"),  # not a duration
        ("worker", "restart", ["on-failure"]),  # wrong type
        ("dashboard", "ports", ["127.0.0.1:eighty:8080"]),  # not a port
        ("create", "depends_on", {"postgres": {"condition": "service_ready"}}),
    ],
)
def test_compose_schema_check_rejects_what_compose_would_reject(
    service: str, key: str, value: object
) -> None:
    config = compose_config(PASSWORD_SET)
    config["services"][service][key] = value
    errors = compose_schema_errors(config)
    assert errors and all(e.startswith(f"services.{service}") for e in errors), errors


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A:-x}/${B-y}", {}, "x/y"),
        ("${A:-x}/${B-y}", {"A": "", "B": ""}, "x/"),
        ("${A:-x}", {"A": "a"}, "a"),
        ("$A and ${A}", {"A": "a"}, "a and a"),
        ("${A:+set}|${B+set}", {"A": "", "B": ""}, "|set"),
        ("$$A $${A}", {"A": "a"}, "$A ${A}"),
        ("${A}", {}, ""),
        ("${A:?say A}", None, "<A>"),
        ("${A}-${B:-b}", None, "<A>-b"),
    ],
)
def test_compose_interpolation_follows_compose(
    text: str, env: dict[str, str] | None, expected: str
) -> None:
    assert compose_interpolate(text, env) == expected


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_installs_the_project_with_search_as_entrypoint() -> None:
    instructions = dockerfile_instructions()
    base = next(v for k, v in instructions if k == "FROM")
    assert base.startswith(("python:3.11-slim", "nvidia/cuda")), base
    assert image_entrypoint() == ["search"]
    runs = [v for k, v in instructions if k == "RUN"]
    assert any(re.search(r"\bpip install\b.*\s\.(\s|$)", run) for run in runs), runs
    (cmd,) = [json.loads(v) for k, v in instructions if k == "CMD"]
    check_search(cmd)


def test_dockerfile_copies_existing_paths_including_studies_and_examples() -> None:
    destinations = []
    for kind, value in dockerfile_instructions():
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


def test_slurm_is_a_job_array_with_one_gpu_per_task() -> None:
    directives = sbatch_directives()
    assert any(d.startswith("--array=") for d in directives), directives
    assert "--gres=gpu:1" in directives


def test_slurm_task_execs_a_real_worker_on_cuda0() -> None:
    calls = shell_calls(SLURM.read_text(), "search")
    workers = [args for args in calls if check_search(args)[0] == "worker"]
    assert workers, calls
    args = workers[-1]
    assert option_value(args, "--device") == "cuda:0"
    assert option_value(args, "--checkpoint-dir")
    assert re.search(r"^exec search worker ", SLURM.read_text(), re.MULTILINE)


def test_slurm_signal_comes_before_the_worker_stop_timeout_runs_out() -> None:
    text = SLURM.read_text()
    (lead,) = [int(d.rsplit("@", 1)[1]) for d in sbatch_directives() if d.startswith("--signal")]
    default = re.search(r"STOP_TIMEOUT:-(\d+)", text)
    assert default, "the script sets no default STOP_TIMEOUT"
    assert lead > int(default[1])


def test_slurm_takes_the_storage_url_from_the_environment_never_inline() -> None:
    text = SLURM.read_text()
    assert "SEARCH_STORAGE" in text
    assert not re.search(r"://[^\s:/@]+:[^\s@]+@", text), "a password in the script"
    for args in shell_calls(text, "search"):
        if check_search(args)[0] == "worker":
            assert option_value(args, "--storage") is None


# --- Kubernetes ----------------------------------------------------------------------------


def test_k8s_jobs_run_real_commands_and_work_on_the_created_study() -> None:
    jobs = k8s_jobs()
    create_cmd, (spec_path,) = check_search(container_call(job_container(jobs["search-create"])))
    worker_args = container_call(job_container(jobs["search-workers"]))
    worker_cmd, (study,) = check_search(worker_args)
    assert (create_cmd, worker_cmd) == ("create", "worker")
    assert study == spec_name(spec_path)
    assert option_value(worker_args, "--device") == "cuda:0"


def test_k8s_workers_take_one_gpu_each_and_restart_on_failure() -> None:
    job = k8s_jobs()["search-workers"]
    spec = job["spec"]
    assert spec["parallelism"] >= 1 and spec["completions"] == spec["parallelism"]
    assert spec["backoffLimit"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert job_container(job)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_grace_period_exceeds_the_worker_stop_timeout() -> None:
    job = k8s_jobs()["search-workers"]
    args = container_call(job_container(job))
    stop_timeout = float(option_value(args, "--stop-timeout") or 120)
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > stop_timeout


def test_k8s_checkpoint_dir_is_a_shared_volume() -> None:
    docs = k8s_documents(K8S_WORKERS)
    job = k8s_jobs()["search-workers"]
    container = job_container(job)
    checkpoint_dir = option_value(container_call(container), "--checkpoint-dir")
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
    container = job_container(k8s_jobs()[job_name])
    (storage,) = [e for e in container["env"] if e["name"] == "SEARCH_STORAGE"]
    assert "value" not in storage
    assert {"name", "key"} <= set(storage["valueFrom"]["secretKeyRef"])
    for _, value in strings(container):
        assert "://" not in value, f"a URL written into the manifest: {value}"


# --- GPU smoke script ----------------------------------------------------------------------


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(path: Path) -> None:
    result = shellcheck(path)
    assert result.returncode == 0, result.stdout


def test_smoke_script_runs_real_commands() -> None:
    calls = {check_search(args)[0]: args for args in shell_calls(SMOKE.read_text(), "search")}
    launch, status = calls["launch"], calls["status"]
    assert option_value(launch, "--workers-per-gpu") is not None
    assert "--no-progress" in launch
    assert option_value(launch, "--storage") == option_value(status, "--storage")
    assert "--json" in status


def test_status_json_has_the_fields_the_smoke_script_reads(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'smoke.db'}"
    runner = CliRunner()
    created = runner.invoke(app, ["create", "studies/digits_mlp.yaml", "--storage", storage])
    assert created.exit_code == 0, created.output
    shown = runner.invoke(
        app, ["status", spec_name("studies/digits_mlp.yaml"), "--storage", storage, "--json"]
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


def test_docs_commands_exist() -> None:
    code = doc_code()
    search_calls = shell_calls(code, "search")
    assert {check_search(args)[0] for args in search_calls} >= {"launch", "create", "worker"}
    for args in shell_calls(code, "optuna-dashboard"):
        assert len(check_args(dashboard_usage(), args)) == 1


def test_docs_name_files_that_exist() -> None:
    for path in set(re.findall(r"\b(?:deploy|scripts|studies)/[\w./-]*\w", DOCS.read_text())):
        assert (REPO / path).exists(), f"docs/deployment.md names {path}, which does not exist"


def test_docs_connection_count_matches_the_pool() -> None:
    assert f"at most **{POOL_SIZE + POOL_OVERFLOW}**" in DOCS.read_text()
    assert f"`{POOL_SIZE + POOL_OVERFLOW} × N`" in DOCS.read_text()
