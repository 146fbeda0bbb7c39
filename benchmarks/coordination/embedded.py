"""The embedded default storage under 8 local workers: does the file hold, and at what cost?

Three runs of the same sleep-based objective (`coord_sleepy.py`, 20 epochs a trial, a report
and a prune decision every epoch) to a budget of `--trials` trials, 8 worker processes each:

- search: the real `search launch SPEC --workers 8` on the default SQLite file (WAL);
- plain Optuna on a SQLite file (`sqlite:///...`, Optuna's defaults);
- plain Optuna on Optuna's JournalStorage with a JournalFileBackend file.

Reported: wall time, finished trials, epochs per minute against the ideal, errors ("database
is locked", tracebacks, ERROR lines, non-zero exits), and lost reports: report calls the
objective made (its ledger) minus intermediate values stored in the study.

    python benchmarks/coordination/embedded.py [--workers 8] [--trials 80] [--epoch-seconds 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import ERROR_PATTERNS, _env, spec_for  # noqa: E402
from plain_worker import open_plain_storage  # noqa: E402


def _ledger_stats(ledger: Path, n: int, epoch_seconds: float) -> dict[str, Any]:
    starts, ends, calls = [], [], 0
    for path in ledger.glob("*.log"):
        for line in path.read_text().splitlines():
            kind, stamp, *_ = line.split()
            if kind == "S":
                starts.append(float(stamp))
            elif kind == "E":
                ends.append(float(stamp))
                calls += 1
    span = (max(ends) - min(starts)) / 60 if ends and starts else 0.0
    per_minute = calls / span if span else 0.0
    ideal = n * 60 / epoch_seconds
    return {"report_calls": calls, "epochs_per_min": round(per_minute),
            "ideal_per_min": round(ideal), "time_lost": round(1 - per_minute / ideal, 3)}


def _errors(folder: Path) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    examples: list[str] = []
    for path in folder.rglob("*"):
        if (not path.is_file() or path.parent.name == "ledger" or path.name == "journal.log"
                or path.suffix not in (".txt", ".log")):
            continue
        for line in path.read_text(errors="replace").splitlines():
            for pattern in ERROR_PATTERNS:
                if pattern in line:
                    counts[pattern.strip()] += 1
                    if pattern != "Traceback" and len(examples) < 3 and line not in examples:
                        examples.append(line.strip()[:300])
    return {**counts, "examples": examples} if counts else {}


def _study_stats(storage: Any, name: str) -> dict[str, Any]:
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    return {"states": dict(states),
            "finished": states["COMPLETE"] + states["PRUNED"],
            "stored_reports": sum(len(t.intermediate_values) for t in trials)}


def run_search(workdir: Path, n: int, trials: int, epoch_seconds: float) -> dict[str, Any]:
    name = "embedded-search"
    ledger = workdir / "ledger"
    ledger.mkdir()
    spec = spec_for(name)
    spec["n_trials"] = trials
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    url = f"sqlite:///{workdir / 'search.db'}"
    began = time.perf_counter()
    with (workdir / "launch.txt").open("w") as log:
        returncode = subprocess.run(
            [sys.executable, "-m", "search", "launch", str(path), "--storage", url,
             "--workers", str(n), "--no-progress", "--log-dir", str(workdir / "logs")],
            cwd=workdir, env=_env(ledger, "embedded", epoch_seconds), stdout=log,
            stderr=subprocess.STDOUT, timeout=1800,
        ).returncode
    wall = time.perf_counter() - began
    from search.storage import open_storage

    return {"system": "search launch (SQLite, WAL)", "wall_s": round(wall, 1),
            "exit_codes": [returncode], **_study_stats(open_storage(url), name),
            **_ledger_stats(ledger, n, epoch_seconds), "errors": _errors(workdir)}


def run_plain(workdir: Path, kind: str, n: int, trials: int,
              epoch_seconds: float) -> dict[str, Any]:
    name = f"embedded-plain-{kind}"
    ledger = workdir / "ledger"
    ledger.mkdir()
    url = (f"journal:{workdir / 'journal.log'}" if kind == "journal"
           else f"sqlite:///{workdir / 'plain.db'}")
    optuna.create_study(study_name=name, storage=open_plain_storage(url))
    began = time.perf_counter()
    procs = []
    for i in range(n):
        log = (workdir / f"worker-{i}.txt").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "plain_worker.py"), url, name, str(trials), "20"],
            cwd=workdir, env=_env(ledger, "embedded", epoch_seconds), stdout=log,
            stderr=subprocess.STDOUT))
    codes = [proc.wait(timeout=1800) for proc in procs]
    wall = time.perf_counter() - began
    label = ("plain Optuna (JournalFileBackend)" if kind == "journal"
             else "plain Optuna (SQLite, Optuna defaults)")
    return {"system": label, "wall_s": round(wall, 1), "exit_codes": codes,
            **_study_stats(open_plain_storage(url), name),
            **_ledger_stats(ledger, n, epoch_seconds), "errors": _errors(workdir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--epoch-seconds", type=float, default=0.05)
    parser.add_argument("--only", choices=("search", "sqlite", "journal"), action="append",
                        help="run only these (default: all three)")
    parser.add_argument("--out", default="embedded.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for kind in args.only or ("search", "sqlite", "journal"):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            row = (run_search(workdir, args.workers, args.trials, args.epoch_seconds)
                   if kind == "search" else
                   run_plain(workdir, kind, args.workers, args.trials, args.epoch_seconds))
            row["lost_reports"] = row["report_calls"] - row["stored_reports"]
            if row["errors"]:  # keep the logs to read
                kept = Path(tempfile.mkdtemp(prefix=f"embedded-{kind}-"))
                shutil.copytree(workdir, kept, dirs_exist_ok=True)
                row["logs_kept_in"] = str(kept)
            print(json.dumps(row), flush=True)
            rows.append(row)
    results = {"command": "python benchmarks/coordination/embedded.py " + " ".join(sys.argv[1:]),
               "load_before": load_before,
               "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()), "rows": rows}
    (HERE / args.out).write_text(json.dumps(results, indent=1))
    print(f"| storage ({args.workers} workers, budget {args.trials}) | wall s | finished | "
          "epochs/min (lost) | errors | lost reports | exit codes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items() if k != "examples") or "0"
        print(f"| {r['system']} | {r['wall_s']} | {r['finished']} / {args.trials} | "
              f"{r['epochs_per_min']:,} ({r['time_lost']:.0%}) | {errors} | "
              f"{r['lost_reports']} | {sorted(set(r['exit_codes']))} |")


if __name__ == "__main__":
    main()
