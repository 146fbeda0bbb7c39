"""Dispatch: one worker per GPU with CUDA_VISIBLE_DEVICES, restarts, Ctrl-C hands trials back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    assert_exact_budget,
    cli_env,
    load_trials,
    running_with_epochs,
    search_command,
    sleepy_spec,
    wait_for,
)
from optuna.trial import TrialState

from search.exceptions import LaunchError
from search.launcher import _last_error_line, check_gpus, plan_workers, visible_gpus


def test_one_worker_per_gpu_each_seeing_only_its_gpu() -> None:
    plans = plan_workers(workers=None, gpus=["0", "2"], workers_per_gpu=2)
    assert [(p.device, p.env["CUDA_VISIBLE_DEVICES"]) for p in plans] == [
        ("cuda:0", "0"), ("cuda:0", "0"), ("cuda:0", "2"), ("cuda:0", "2")]


def test_workers_cap_the_gpu_workers() -> None:
    assert len(plan_workers(workers=3, gpus=["0", "1", "2", "3"])) == 3


def test_cpu_workers_share_the_cores() -> None:
    plans = plan_workers(workers=None, gpus=[], cpu_count=8)
    assert len(plans) == 4
    assert {p.device for p in plans} == {"cpu"}
    assert {p.env["OMP_NUM_THREADS"] for p in plans} == {"2"}
    assert {p.env["CUDA_VISIBLE_DEVICES"] for p in plans} == {""}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"workers": 0, "gpus": []}, "workers must be >= 1"),
    ({"workers": None, "gpus": ["0"], "workers_per_gpu": 0}, "workers_per_gpu must be >= 1"),
])
def test_bad_plans_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_workers(**kwargs)


@pytest.mark.parametrize(("declared", "expected"), [("1,3", ["1", "3"]), ("", []), ("-1", [])])
def test_visible_gpus_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch,
                                                     declared: str, expected: list[str]) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", declared)
    assert visible_gpus() == expected


def _launcher(spec_path: Path, storage: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        search_command("launch", str(spec_path), "--storage", storage, "--no-progress",
                       "--log-dir", str(spec_path.parent / "logs"), *args),
        env=cli_env(SEARCH_TEST_EPOCH_SECONDS="0.4", **env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_gpu_dispatch_sets_cuda_visible_devices_per_worker(
        sqlite_url: str, study_name: str, write_spec) -> None:
    # No GPU here: the machine declares six (CUDA_VISIBLE_DEVICES) and the objective only
    # reports the CUDA_VISIBLE_DEVICES its worker was given.
    spec = write_spec(sleepy_spec(study_name, n_trials=8, epochs=1,
                                  objective={"function": "objectives:env_probe"}))
    launcher = _launcher(spec, sqlite_url, "--gpus", "3,5", "--workers-per-gpu", "2",
                         CUDA_VISIBLE_DEVICES="0,1,2,3,4,5")
    _, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 0, err[-3000:]
    trials = load_trials(sqlite_url, study_name)
    rows = [t.user_attrs["epoch_metrics"][0] for t in trials]
    assert {r["gpu"] for r in rows} <= {3.0, 5.0}
    assert all(r["cuda0"] == 1.0 for r in rows)
    assert len({t.user_attrs["worker"] for t in trials}) >= 3
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}


@pytest.mark.slow
def test_ctrl_c_stops_workers_and_leaves_nothing_running(
        sqlite_url: str, study_name: str, write_spec) -> None:
    spec = write_spec(sleepy_spec(study_name, n_trials=20, epochs=6))
    launcher = _launcher(spec, sqlite_url, "--workers", "2")
    wait_for(lambda: running_with_epochs(sqlite_url, study_name, 1), 60, "a running trial")
    os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the group
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, err[-3000:]
    assert "Interrupted" in err
    states = Counter(t.state for t in load_trials(sqlite_url, study_name))
    assert states[TrialState.RUNNING] == 0
    assert states[TrialState.WAITING] >= 1, "the interrupted trials are queued for a retry"


@pytest.mark.slow
def test_a_crashed_worker_is_restarted_and_the_budget_is_still_exact(
        sqlite_url: str, study_name: str, write_spec) -> None:
    spec = write_spec(sleepy_spec(study_name, n_trials=6, epochs=3))
    launcher = _launcher(spec, sqlite_url, "--workers", "2")
    running = wait_for(lambda: running_with_epochs(sqlite_url, study_name, 1), 60,
                       "a running trial")
    victim = running.user_attrs["pid"]  # the worker of a trial that reported (it wrote its pid)
    os.kill(victim, signal.SIGKILL)
    _, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 0, err[-3000:]
    assert "crashed (exit -9); restart 1/3" in err
    assert_exact_budget(sqlite_url, study_name, 6)


@pytest.mark.parametrize(("requested", "available", "ids"), [
    ("0", ["0", "1"], ["0"]),
    ("1, 0", ["0", "1"], ["1", "0"]),
    ("2,3", ["2", "3"], ["2", "3"]),  # CUDA_VISIBLE_DEVICES=2,3 declares physical ids 2 and 3
])
def test_requested_gpus_that_exist_are_used(requested: str, available: list[str],
                                            ids: list[str]) -> None:
    assert check_gpus(requested, available) == ids


@pytest.mark.parametrize(("requested", "available", "missing"), [
    ("0", [], "no GPU 0 (GPUs visible here: none;"),
    ("1,4", ["0", "1"], "no GPU 4 (GPUs visible here: 0, 1;"),
    (",", ["0"], "no GPU , (GPUs visible here: 0;"),
])
def test_requested_gpus_this_machine_lacks_are_refused(requested: str, available: list[str],
                                                       missing: str) -> None:
    with pytest.raises(LaunchError, match=re.escape(f"--gpus {requested}: this machine has "
                                                    f"{missing}")):
        check_gpus(requested, available)


@pytest.mark.parametrize(("log", "cause"), [
    ("... INFO search.worker: Trial 0 started\nError: 5 trials failed with errors "
     "(max_failures=5); the last: error: RuntimeError: boom\n",
     "5 trials failed with errors (max_failures=5); the last: error: RuntimeError: boom"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
     "torch.AcceleratorError: Torch not compiled with CUDA enabled\n"
     "2026-12-01 10:00:00,000 INFO search.cli: Worker done\n",
     "torch.AcceleratorError: Torch not compiled with CUDA enabled"),
    ("2026-12-01 10:00:00,000 INFO search.worker: Trial 0 finished\n", None),
])
def test_the_first_cause_is_read_from_a_worker_log(tmp_path: Path, log: str,
                                                   cause: str | None) -> None:
    (tmp_path / "worker-0.log").write_text(log)
    assert _last_error_line(tmp_path / "worker-0.log") == cause
