"""`search launch studies/digits_mlp.yaml` against a hand-rolled plain-Optuna script, same run.

Both run 20 trials of the same built-in trainer with 2 worker processes on one storage:
- search: `search launch studies/digits_mlp.yaml --n-trials 20 --workers 2`;
- plain Optuna: 2 processes each calling `study.optimize(objective)` with
  `MaxTrialsCallback(20)` and a MedianPruner, the usual recipe (one torch thread each, as
  `search launch` gives its workers).

Reported per storage (SQLite file, local PostgreSQL): wall time, finished trials (the budget
is 20), the best trial's validation accuracy, and the ratio of wall times.

    python benchmarks/digits_launch.py [--storage-pg postgresql://postgres@127.0.0.1:5432/bench]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from search.objective import build_training_function  # noqa: E402
from search.space import suggest, trainer_params  # noqa: E402
from search.spec import load_spec  # noqa: E402
from search.storage import normalize_url, open_storage  # noqa: E402

N_TRIALS = 20


def _plain_worker(storage: str, name: str) -> None:
    import torch

    torch.set_num_threads(1)  # as `search launch` gives each of its 2 workers one core
    spec = load_spec(REPO / "studies" / "digits_mlp.yaml")
    train = build_training_function(spec)

    def objective(trial: optuna.Trial) -> float:
        params, _ = trainer_params(suggest(trial, spec), spec)
        best = [float("inf")]

        def report(step: int, metrics: dict[str, float]) -> None:
            trial.report(metrics["val_loss"], step)
            trial.set_user_attr("val_accuracy", metrics["val_accuracy"])
            best[0] = min(best[0], metrics["val_loss"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        train(params, "cpu", report)
        return best[0]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=optuna.samplers.TPESampler(n_startup_trials=6),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=5,
                                                                 n_warmup_steps=5))
    callback = optuna.study.MaxTrialsCallback(N_TRIALS, states=(TrialState.COMPLETE,
                                                                TrialState.PRUNED))
    study.optimize(objective, callbacks=[callback])


def run_plain(storage: str) -> dict[str, float]:
    name = f"plain-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=storage, direction="minimize")
    began = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_plain_worker, args=(storage, name)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    wall = time.perf_counter() - began
    study = optuna.load_study(study_name=name, storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    best = study.best_trial
    return {"wall_s": wall, "finished": len(finished),
            "best_val_accuracy": float(best.user_attrs["val_accuracy"])}


def run_search(storage: str, workdir: Path) -> dict[str, float]:
    spec = (REPO / "studies" / "digits_mlp.yaml").read_text()
    name = f"digits-{uuid.uuid4().hex[:8]}"
    path = workdir / f"{name}.yaml"
    path.write_text(spec.replace("name: digits-mlp", f"name: {name}"))
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "search", "launch", str(path), "--storage", storage,
                    "--n-trials", str(N_TRIALS), "--workers", "2", "--no-progress",
                    "--log-dir", str(workdir / "logs")],
                   check=True, capture_output=True, cwd=workdir)
    wall = time.perf_counter() - began
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "search", "status", name, "--storage", storage, "--json"],
        check=True, capture_output=True, text=True).stdout)
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    rows = study.best_trial.user_attrs["epoch_metrics"]
    best_epoch = min(rows, key=lambda r: r["val_loss"])
    counts = status["counts"]
    return {"wall_s": wall, "finished": counts["COMPLETE"] + counts["PRUNED"],
            "best_val_accuracy": float(best_epoch["val_accuracy"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage-pg", default="postgresql://postgres@127.0.0.1:5432/bench")
    args = parser.parse_args()
    engine = sqlalchemy.create_engine(normalize_url(args.storage_pg.rsplit("/", 1)[0]
                                                    + "/postgres"),
                                      isolation_level="AUTOCOMMIT")
    database = args.storage_pg.rsplit("/", 1)[1]
    with engine.connect() as connection:
        exists = connection.execute(sqlalchemy.text(
            "SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}).scalar()
        if not exists:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    engine.dispose()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for label, url in (("SQLite", f"sqlite:///{workdir / 'bench.db'}"),
                           ("PostgreSQL", args.storage_pg)):
            ours = run_search(url, workdir)
            plain = run_plain(normalize_url(url))
            rows.append((label, ours, plain))
    print(f"| storage | tool | wall (s) | finished / {N_TRIALS} | best val accuracy |")
    print("|---|---|---|---|---|")
    for label, ours, plain in rows:
        for tool, r in (("search launch", ours), ("plain Optuna", plain)):
            print(f"| {label} | {tool} | {r['wall_s']:.1f} | {r['finished']} | "
                  f"{r['best_val_accuracy']:.3f} |")
        print(f"| {label} | ratio search / plain | {ours['wall_s'] / plain['wall_s']:.2f} | | |")


if __name__ == "__main__":
    main()
