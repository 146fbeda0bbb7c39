"""Slurm for real: deploy/slurm/search-workers.sbatch as a job array on a one-node cluster.

The cluster is Debian's slurm-wlm and munge, configured and started on this machine by
deploy/slurm/local-cluster.sh (4 CPUs, 2 fake GPUs as `gres`, so `--gres=gpu:1` schedules and
Slurm sets CUDA_VISIBLE_DEVICES per task). The study lives in the real PostgreSQL. A missing
Slurm is installed with apt-get when the tests run as root on Debian (tests/system_tools.py);
elsewhere these tests fail, naming the packages.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import REPO, cli_env, exact_trials, sleepy_spec, wait_for
from optuna.trial import TrialState
from system_tools import require

from search import record
from search.storage import open_storage

pytestmark = pytest.mark.slow

LOCAL_CLUSTER = REPO / "deploy" / "slurm" / "local-cluster.sh"
SBATCH = REPO / "deploy" / "slurm" / "search-workers.sbatch"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    for tool in TOOLS:  # installed with apt-get when missing on CI, else a failure
        require(tool, "slurm-wlm", "munge")
    started = subprocess.run([str(LOCAL_CLUSTER), "start"], capture_output=True, text=True,
                             timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    printed = subprocess.run([str(LOCAL_CLUSTER), "env"], capture_output=True, text=True,
                             check=True).stdout
    return printed.strip().removeprefix("export SLURM_CONF=")


def _env(slurm_conf: str, pg_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return cli_env(pg_url, SLURM_CONF=slurm_conf, CHECKPOINT_DIR=str(tmp_path / "ckpt"),
                   SEARCH_VENV=sys.prefix, STOP_TIMEOUT="10", **extra)


def _create(spec: dict[str, Any], pg_url: str, tmp_path: Path) -> optuna.Study:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "search", "create", str(path), "--storage", pg_url],
                   check=True, capture_output=True, env=cli_env(), timeout=120)
    return optuna.load_study(study_name=spec["name"], storage=open_storage(pg_url))


def _sbatch(env: dict[str, str], tmp_path: Path, study: str, *options: str
            ) -> subprocess.CompletedProcess[str]:
    """Submit the repository's script, shrinking its per-task resources to this machine."""
    return subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=500M", "--time=10",
         f"--output={tmp_path}/task-%a.out", f"--chdir={tmp_path}", *options, str(SBATCH),
         study],
        capture_output=True, text=True, env=env, timeout=600)


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    return wait_for(condition, timeout, what)


def _queue(env: dict[str, str], job: str) -> dict[str, str]:
    """Array task id -> state, for the tasks of `job` still known to the controller."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%K %T"], capture_output=True,
                         text=True, env=env, check=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _ended(env: dict[str, str], job: str) -> dict[str, str]:
    """Array task id -> exit code (`status:signal`), for the tasks of `job` that completed."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True,
                         text=True, env=env, check=True).stdout
    fields = [dict(f.split("=", 1) for f in line.split() if "=" in f)
              for line in out.splitlines()]
    return {f["ArrayTaskId"]: f["ExitCode"] for f in fields if f.get("JobState") == "COMPLETED"}


def test_array_runs_the_study_to_exactly_n_trials_one_gpu_per_task(
        slurm_conf: str, pg_url: str, study_name: str, tmp_path: Path) -> None:
    study = _create(sleepy_spec(study_name, n_trials=6, epochs=2,
                                objective={"function": "objectives:env_probe"}),
                    pg_url, tmp_path)
    env = _env(slurm_conf, pg_url, tmp_path)
    submitted = _sbatch(env, tmp_path, study_name, "--array=0-2")
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    # polled here: `sbatch --wait` polls at growing intervals, up to 30 s after the end
    _wait_for(lambda: not _queue(env, job), "the array to finish", 240)
    logs = {p.name: p.read_text() for p in tmp_path.glob("task-*.out")}
    assert _ended(env, job) == {"0": "0:0", "1": "0:0", "2": "0:0"}, logs
    trials = exact_trials(study, 6)
    assert sorted(logs) == ["task-0.out", "task-1.out", "task-2.out"]
    placed = [re.search(r"GPU (\S+) of the node, CUDA_VISIBLE_DEVICES=(\S+)", text)
              for text in logs.values()]
    assert all(placed), logs
    gpus = Counter(match[1] for match in placed if match)
    assert set(gpus) == {"0", "1"}, f"tasks 0 and 1 ran at once, on the two GPUs: {gpus}"
    # the node's id, or 0 where each task is confined to its own device (ConstrainDevices)
    assert all(match[2] in (match[1], "0") for match in placed if match)
    workers = {t.user_attrs[record.WORKER] for t in trials}
    assert workers <= {f"slurm-{job}-{task}-r0" for task in range(3)}
    for trial in trials:
        assert trial.user_attrs[record.DEVICE] == "cuda:0"
        assert trial.user_attrs[record.EPOCH_METRICS][-1]["gpu"] in (0.0, 1.0)


def test_preempted_and_requeued_tasks_hand_their_trials_back(
        slurm_conf: str, pg_url: str, study_name: str, tmp_path: Path) -> None:
    """`scancel --signal=TERM` and `scontrol requeue` stop a task mid-trial: the worker
    finishes its epoch and hands the trial back; its retry resumes from the checkpoint and the
    study ends at exactly n_trials. The requeued task comes back as restart 1."""
    study = _create(sleepy_spec(study_name, n_trials=6, epochs=8), pg_url, tmp_path)
    env = _env(slurm_conf, pg_url, tmp_path, SEARCH_TEST_EPOCH_SECONDS="0.5")
    submitted = _sbatch(env, tmp_path, study_name, "--array=0-1")
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]

    def under_way(task: int) -> Callable[[], int | None]:
        def trial_number() -> int | None:
            for t in study.get_trials(states=(TrialState.RUNNING,)):
                early = 1 <= len(t.intermediate_values) <= 3  # 5 epochs (2.5 s) still to go
                if early and t.user_attrs.get(record.WORKER) == f"slurm-{job}-{task}-r0":
                    return t.number + 1  # truthy for trial 0
            return None

        return trial_number

    def handed_back(number: int) -> bool:
        trial = study.get_trials()[number]
        return trial.state == TrialState.FAIL

    try:
        cancelled = _wait_for(under_way(0), "task 0 to be training") - 1
        subprocess.run(["scancel", "--signal=TERM", "--full", f"{job}_0"], env=env, check=True)
        _wait_for(lambda: handed_back(cancelled), "task 0 to hand its trial back", 60)
        _wait_for(lambda: "0" not in _queue(env, job), "task 0 to exit")

        requeued = _wait_for(under_way(1), "task 1 to be training") - 1
        subprocess.run(["scontrol", "requeue", f"{job}_1"], env=env, check=True)
        _wait_for(lambda: handed_back(requeued), "task 1 to hand its trial back", 60)
        _wait_for(lambda: _queue(env, job).get("1") == "PENDING", "task 1 back in the queue")
        # Slurm holds a requeued batch job for 2 minutes; start it now instead.
        subprocess.run(["scontrol", "update", f"jobid={job}_1", "StartTime=now"], env=env,
                       check=True)
        _wait_for(lambda: not _queue(env, job), "the array to finish", 240)
    finally:
        subprocess.run(["scancel", job], env=env, check=False)
    trials = exact_trials(study, 6)
    by_number = {t.number: t for t in trials}
    for number in (cancelled, requeued):
        trial = by_number[number]
        assert trial.user_attrs[record.FAIL_REASON] == record.Outcome.PREEMPTED.value
        while trial.state == TrialState.FAIL:  # a retry may itself have been the one requeued
            (trial,) = [t for t in trials if t.user_attrs.get(record.RETRY_OF) == trial.number]
        assert trial.state == TrialState.COMPLETE
        assert trial.user_attrs[record.RESUMED_FROM_EPOCH] >= 1, "resumed from its checkpoint"
    workers = {t.user_attrs.get(record.WORKER) for t in trials}
    assert f"slurm-{job}-1-r1" in workers, "the requeued task ran again and took trials"
    log = (tmp_path / "task-1.out").read_text()
    assert log.count("search-workers: task 1") == 2, "both runs of task 1 in one log"


def test_local_cluster_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(LOCAL_CLUSTER)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
