"""Two launchers on one host, one of them stopped with SIGTERM (GitHub issue 7, defect 3).

Each run creates a fresh study (sleep-based objective, `benchmarks/sleepy_objective.py`),
starts launchers A and B on this host against it (`--workers` each, one shared `--log-dir`),
waits until both have trials running, sends SIGTERM to A and lets B finish. It then reports,
per run: A's and B's exit codes, the finished trials against the budget, trials of B that were
failed (must be 0: before the fix A's hand-back failed them, as the workers had the same
names), trials handed back by A, and the worker log files (one per launcher and slot).

    python benchmarks/two_launchers.py --storage postgresql://postgres@127.0.0.1:5432/test

Exits 1 when a run breaks an invariant (B exits 0 with the budget met exactly, nothing
RUNNING or WAITING, no trial of B failed, A's workers write their own logs).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _spec(name: str, n_trials: int) -> dict:
    return {
        "name": name,
        "n_trials": n_trials,
        "epochs": 4,
        "seed": 0,
        "space": {"x": {"type": "float", "low": -1.0, "high": 1.0}},
        "objective": {"function": "sleepy_objective:train"},
        "workers": {"heartbeat_interval": 1, "grace_period": 5},
    }


def _launch(spec: Path, storage: str, logs: Path, workers: int, err: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]),
        "CRASH_BENCH_EPOCH_SECONDS": "0.5",
    }
    env.pop("SEARCH_STORAGE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "search", "launch", str(spec), "--storage", storage,
         "--no-progress", "--workers", str(workers), "--log-dir", str(logs)],
        stdout=subprocess.DEVNULL, stderr=err.open("wb"), env=env, cwd=spec.parent)


def _running_pids(study: optuna.Study) -> set[int]:
    return {t.user_attrs["pid"] for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.RUNNING and "pid" in t.user_attrs}


def one_run(storage: str, workers: int, n_trials: int) -> dict:
    from search.storage import open_storage

    name = f"two-launchers-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix="two-launchers-"))
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(name, n_trials)))
    logs = folder / "logs"
    first = _launch(spec, storage, logs, workers, folder / "a.err")
    time.sleep(1.0)  # let A create the study
    second = _launch(spec, storage, logs, workers, folder / "b.err")
    deadline = time.monotonic() + 120
    study = None
    opened = open_storage(storage)
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=opened)
            if len(_running_pids(study)) >= 2 * workers:
                break
        except KeyError:
            pass
        time.sleep(0.3)
    assert study is not None
    a_pids = {int(line.split("(pid ")[1].split(")")[0])
              for line in (folder / "a.err").read_text().splitlines() if "(pid " in line}
    b_running = {t.number for t in study.get_trials(deepcopy=False)
                 if t.state == TrialState.RUNNING and t.user_attrs.get("pid") not in a_pids}
    first.send_signal(signal.SIGTERM)
    a_code = first.wait(timeout=180)
    b_code = second.wait(timeout=600)
    trials = optuna.load_study(study_name=name, storage=opened).trials
    opened.engine.dispose()
    b_pids = {t.user_attrs.get("pid") for t in trials} - a_pids - {None}
    failed_b = [t for t in trials if t.state == TrialState.FAIL
                and t.user_attrs.get("pid") in b_pids]
    handed_a = [t for t in trials if t.state == TrialState.FAIL
                and t.user_attrs.get("pid") in a_pids]
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    left = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return {
        "A exit": a_code,
        "B exit": b_code,
        "finished / budget": f"{finished} / {n_trials}",
        "left RUNNING or WAITING": left,
        "B trials running at the SIGTERM": len(b_running),
        "B trials failed": len(failed_b),
        "A trials handed back": len(handed_a),
        "log files": len(list(logs.glob("*.log"))),
        "ok": b_code == 0 and finished == n_trials and left == 0 and not failed_b
        and a_code == 130 and len(list(logs.glob("*.log"))) == 2 * workers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="workers per launcher")
    parser.add_argument("--n-trials", type=int, default=12)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    rows = [one_run(args.storage, args.workers, args.n_trials) for _ in range(args.runs)]
    keys = list(rows[0])
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for i, row in enumerate(rows, 1):
        print(f"| {i} | " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
