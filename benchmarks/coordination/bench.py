"""Coordination cost: N `search worker` processes vs N plain-Optuna workers on one PostgreSQL.

Every worker runs the same sleep-based objective (`coord_sleepy.py`: an "epoch" is a sleep of
`--epoch-seconds`, then one report and one prune decision; 20 epochs a trial), so all time a
worker does not sleep is coordination. For each row (N workers, optionally a study pre-filled
with finished trials) the two systems are measured IN THE SAME RUN, in pairs, alternating
which goes first, so that their ratio holds on a noisy, shared machine:

- search: `python -m search worker STUDY` processes (the real CLI) on a study made by
  `python -m search create` (TPE, the default pruner);
- plain Optuna: `plain_worker.py` processes, `study.optimize` with TPE + MedianPruner and a
  `MaxTrialsCallback` stop.

Each measurement starts N processes, waits until all have started a trial (or 120 s), then
counts for `--window` seconds: epochs per minute against the ideal N * 60 / epoch, the share of
worker time lost, p50/p95 of the per-epoch call (report + prune; wall and main-thread CPU) and
of the gap between two trials on one worker, the most connections held (pg_stat_activity,
sampled every 0.25 s by application name), the join time (process start -> first trial) and
errors (tracebacks, ERROR lines, "database is locked", workers that exited on their own).
Then every worker is killed (the budget is never reached within the window) and the study is
deleted. With `--tpe-cost` it also times TPE's `ask` + suggest at 1,000 and 5,000 trials.

    python benchmarks/coordination/bench.py --rows 1,8,16,32,16@5000,32@5000 --label before
    python benchmarks/coordination/bench.py --rows 16 --pairs 3 --window 60      # one row

Results go to `benchmarks/coordination/results-LABEL.json` and a Markdown table that is
printed and written into RESULTS.md under the label's heading.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from search.storage import normalize_url  # noqa: E402

DEFAULT_STORAGE = "postgresql://postgres@127.0.0.1:5432/coordbench"
EPOCHS = 20
BIG_BUDGET = 1_000_000
SYSTEMS = ("search", "plain")
ERROR_PATTERNS = ("Traceback", " ERROR ", "Error:", "database is locked")


def spec_for(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "direction": "minimize",
        "metric": "val_loss",
        "n_trials": BIG_BUDGET,
        "epochs": EPOCHS,
        "seed": 0,
        "sampler": {"type": "tpe"},
        "space": {"x": {"type": "float", "low": -1.0, "high": 1.0}},
        "objective": {"function": "coord_sleepy:sleepy"},
    }


def prefill_trials(n: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """`n` finished trials like the objective's: half COMPLETE (20 epochs), half PRUNED."""
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        x = rng.uniform(-1.0, 1.0)
        target = (x - 0.3) ** 2
        pruned = rng.random() < 0.5
        last = rng.randint(6, EPOCHS - 1) if pruned else EPOCHS
        values = {step: target + 1.0 / step for step in range(1, last + 1)}
        trials.append(
            optuna.trial.create_trial(
                params={"x": x},
                distributions={"x": FloatDistribution(-1.0, 1.0)},
                value=None if pruned else values[last],
                intermediate_values=values,
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            )
        )
    return trials


def create_study(system: str, name: str, storage: str, workdir: Path, prefill: int) -> float:
    """Create the study (the real `search create` for search); returns seconds to pre-fill."""
    if system == "search":
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec_for(name), sort_keys=False))
        subprocess.run(
            [sys.executable, "-m", "search", "create", str(path), "--storage", storage,
             "--n-trials", str(BIG_BUDGET + prefill)],
            check=True, capture_output=True, cwd=REPO, env=_env(workdir, "coord-create"),
        )
    else:
        optuna.create_study(study_name=name, storage=normalize_url(storage))
    if not prefill:
        return 0.0
    began = time.perf_counter()
    bulk_insert(storage, name, prefill_trials(prefill))
    return time.perf_counter() - began


def bulk_insert(storage: str, name: str, trials: list[optuna.trial.FrozenTrial]) -> None:
    """`study.add_trials` in one transaction of multi-row INSERTs into Optuna's own tables.

    `add_trials` takes ~30 ms a trial here (a transaction each), minutes for 5,000; this
    writes the same rows in seconds. Benchmark-only use of Optuna's private schema.
    """
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    engine = sqlalchemy.create_engine(normalize_url(storage), poolclass=sqlalchemy.NullPool)
    tables = (models.TrialModel.__table__, models.TrialParamModel.__table__,
              models.TrialValueModel.__table__, models.TrialIntermediateValueModel.__table__)
    trial_t, param_t, value_t, step_t = tables
    now = datetime.datetime.now()
    finite = models.TrialValueModel.TrialValueType.FINITE
    step_finite = models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
    with engine.begin() as connection:
        study_id = connection.execute(
            sqlalchemy.select(models.StudyModel.study_id).where(
                models.StudyModel.study_name == name)).scalar_one()
        first = connection.execute(
            sqlalchemy.select(sqlalchemy.func.count()).select_from(trial_t).where(
                trial_t.c.study_id == study_id)).scalar_one()
        ids = connection.execute(
            sqlalchemy.insert(trial_t).returning(trial_t.c.trial_id, sort_by_parameter_order=True),
            [{"number": first + i, "study_id": study_id, "state": t.state,
              "datetime_start": now, "datetime_complete": now} for i, t in enumerate(trials)],
        ).scalars().all()
        connection.execute(sqlalchemy.insert(param_t), [
            {"trial_id": tid, "param_name": key,
             "param_value": t.distributions[key].to_internal_repr(value),
             "distribution_json": distribution_to_json(t.distributions[key])}
            for tid, t in zip(ids, trials, strict=True) for key, value in t.params.items()])
        values = [{"trial_id": tid, "objective": 0, "value": t.value, "value_type": finite}
                  for tid, t in zip(ids, trials, strict=True) if t.value is not None]
        if values:
            connection.execute(sqlalchemy.insert(value_t), values)
        connection.execute(sqlalchemy.insert(step_t), [
            {"trial_id": tid, "step": step, "intermediate_value": value,
             "intermediate_value_type": step_finite}
            for tid, t in zip(ids, trials, strict=True)
            for step, value in t.intermediate_values.items()])
    engine.dispose()


def _env(ledger: Path, app: str, epoch_seconds: float = 0.05) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SEARCH_STORAGE"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    env.update(COORD_LEDGER=str(ledger), COORD_EPOCH_SECONDS=str(epoch_seconds),
               PGAPPNAME=app, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


class ConnectionSampler(threading.Thread):
    """The most connections of one measurement's workers, sampled every 0.25 s: those with
    its application name (PGAPPNAME) or, since search names its own connections
    `search HOST:PID`, one of its workers' names."""

    def __init__(self, storage: str, app: str) -> None:
        super().__init__(daemon=True)
        self.engine = sqlalchemy.create_engine(
            normalize_url(storage), poolclass=sqlalchemy.NullPool, isolation_level="AUTOCOMMIT")
        self.app, self.peak, self.stop = app, 0, threading.Event()
        self.server_peak = 0
        self.names: list[str] = []

    def run(self) -> None:
        query = sqlalchemy.text(
            "SELECT count(*) FILTER (WHERE application_name = :app "
            "OR application_name = ANY(:names)), count(*) FROM pg_stat_activity")
        with self.engine.connect() as connection:
            while not self.stop.wait(0.25):
                ours, total = connection.execute(
                    query, {"app": self.app, "names": list(self.names)}).one()
                self.peak = max(self.peak, int(ours))
                self.server_peak = max(self.server_peak, int(total))
        self.engine.dispose()


def measure(system: str, n: int, *, prefill: int, storage: str, window: float,
            epoch_seconds: float, workdir: Path, profile: Path | None = None) -> dict[str, Any]:
    name = f"coord-{system}-{uuid.uuid4().hex[:8]}"
    app = f"coord-{uuid.uuid4().hex[:8]}"
    ledger = workdir / name
    ledger.mkdir()
    prefill_s = create_study(system, name, storage, workdir, prefill)
    env = _env(ledger, app, epoch_seconds)
    if system == "search":
        commands = [[sys.executable, "-m", "search", "worker", name, "--storage", storage,
                     "--worker-id", f"w{i}"] for i in range(n)]
    else:
        commands = [[sys.executable, str(HERE / "plain_worker.py"), normalize_url(storage), name,
                     str(BIG_BUDGET + prefill), str(EPOCHS)] for _ in range(n)]
    sampler = ConnectionSampler(storage, app)
    sampler.start()
    load_before = os.getloadavg()[0]
    procs, started = [], {}
    for i, command in enumerate(commands):
        log = (ledger / f"stderr-{i}.txt").open("w")
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        started[proc.pid] = time.time()
        procs.append(proc)
        sampler.names.append(f"search {socket.gethostname()}:{proc.pid}"[:63])
    join_deadline = time.time() + 120
    while time.time() < join_deadline and len(_started_pids(ledger)) < n:
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    t0 = time.time()
    t1 = t0 + window
    spy = None
    if profile is not None:  # py-spy on one worker for the window: where its CPU goes
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(procs[0].pid),
             "-d", str(int(window)), "-r", "50", "--nonblocking", "--format", "raw",
             "-o", str(profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.time() < t1 and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    t1 = min(t1, time.time())
    exited_early = [p.returncode for p in procs if p.poll() is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait()
    if spy is not None:  # it writes what it has when its process is gone
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    sampler.stop.set()
    sampler.join()
    result = _read_ledgers(ledger, started, t0, t1, n, epoch_seconds)
    errors, examples = _count_errors(ledger)
    result.update(
        system=system, workers=n, prefill=prefill, prefill_s=round(prefill_s, 1),
        window_s=round(t1 - t0, 1), max_connections=sampler.peak,
        server_connections_peak=sampler.server_peak,
        errors=errors + sum(1 for rc in exited_early if rc != 0), error_examples=examples,
        exited_early=len(exited_early), load_before=load_before, load_after=os.getloadavg()[0],
    )
    optuna.delete_study(study_name=name, storage=normalize_url(storage))
    return result


def summarize_profile(path: Path, top: int = 60) -> list[tuple[str, float, float]]:
    """(function, % of samples inside it, % of samples in it itself) from py-spy raw stacks."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r"\((.*?):\d+\)$", lambda m: f"({Path(m.group(1)).name})", f)
                  for f in stack.split(";") if f]
        samples = int(count)
        total += samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + samples
    rows = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return [(name, round(100 * c / total, 1), round(100 * own.get(name, 0) / total, 1))
            for name, c in rows] if total else []


def _started_pids(ledger: Path) -> set[str]:
    return {p.stem for p in ledger.glob("*.log") if p.stat().st_size > 0}


def _read_ledgers(ledger: Path, started: dict[int, float], t0: float, t1: float, n: int,
                  epoch_seconds: float) -> dict[str, Any]:
    calls, cpus, gaps, joins = [], [], [], []
    epochs = trials_complete = trials_pruned = 0
    for path in ledger.glob("*.log"):
        pid = int(path.stem)
        last_finish = None
        epochs_in_trial = 0
        first = True
        for line in path.read_text().splitlines():
            kind, *fields = line.split()
            t = float(fields[0])
            if kind == "S":
                if first and pid in started:
                    joins.append(t - started[pid])
                first = False
                if last_finish is not None and t0 <= t <= t1:
                    gaps.append(t - last_finish)
                epochs_in_trial = 0
            elif kind == "E":
                epochs_in_trial += 1
                if t0 <= t <= t1:
                    epochs += 1
                    calls.append(float(fields[1]))
                    cpus.append(float(fields[2]))
            elif kind == "F":
                last_finish = t
                if t0 <= t <= t1:
                    if epochs_in_trial >= EPOCHS:
                        trials_complete += 1
                    else:
                        trials_pruned += 1
    minutes = (t1 - t0) / 60
    per_minute = epochs / minutes if minutes > 0 else 0.0
    ideal = n * 60 / epoch_seconds
    return {
        "epochs": epochs,
        "epochs_per_min": round(per_minute),
        "ideal_per_min": round(ideal),
        "time_lost": round(1 - per_minute / ideal, 3),
        "call_ms_p50": _ms(calls, 50), "call_ms_p95": _ms(calls, 95),
        "call_cpu_ms_p50": _ms(cpus, 50), "call_cpu_ms_p95": _ms(cpus, 95),
        "gap_s_p50": _pct(gaps, 50), "gap_s_p95": _pct(gaps, 95),
        "join_s_p50": _pct(joins, 50), "join_s_max": round(max(joins), 2) if joins else None,
        "joined": len(joins),
        "trials_complete": trials_complete, "trials_pruned": trials_pruned,
    }


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


def _ms(values: list[float], q: int) -> float | None:
    value = _pct([v * 1000 for v in values], q)
    return None if value is None else round(value, 2)


def _count_errors(ledger: Path) -> tuple[int, list[str]]:
    """Error lines in the workers' output, and up to three distinct ones as examples."""
    count, examples = 0, []
    for path in ledger.glob("stderr-*.txt"):
        for line in path.read_text(errors="replace").splitlines():
            if any(pattern in line for pattern in ERROR_PATTERNS):
                count += 1
                line = re.sub(r"^\S+ \S+ ", "", line.strip())[:300]
                if line not in examples and len(examples) < 3:
                    examples.append(line)
    return count, examples


def connections_needed(system: str, n: int) -> int:
    """What N workers would hold at most, to refuse a row that would exhaust the server."""
    if system == "plain":
        return 2 * n
    from search import storage

    # The pool's overflow connection is rarely open at once on every worker (issue 9 measured
    # 46 connections for 16 old-core workers with pools of 3 + 1).
    return int(getattr(storage, "POOL_SIZE", 1)) * n


def server_headroom(storage: str) -> int:
    engine = sqlalchemy.create_engine(normalize_url(storage), poolclass=sqlalchemy.NullPool)
    with engine.connect() as connection:
        used = connection.execute(
            sqlalchemy.text("SELECT count(*) FROM pg_stat_activity")).scalar()
        limit = connection.execute(sqlalchemy.text("SHOW max_connections")).scalar()
        reserved = connection.execute(
            sqlalchemy.text("SHOW superuser_reserved_connections")).scalar()
    engine.dispose()
    return int(limit) - int(reserved) - int(used)


def tpe_cost(sizes: list[int], asks: int = 20) -> list[dict[str, Any]]:
    """Seconds per `ask` + suggest + `tell` of search's sampler and Optuna's default TPE, on an
    in-memory study holding `size` finished trials (the sampler alone, no database)."""
    rows = []
    for size in sizes:
        for label in ("search", "plain"):
            sampler = (_search_sampler() if label == "search"
                       else optuna.samplers.TPESampler(seed=0))
            study = optuna.create_study(sampler=sampler)
            study.add_trials(prefill_trials(size))
            times = []
            for _ in range(asks):
                began = time.perf_counter()
                trial = study.ask()
                x = trial.suggest_float("x", -1.0, 1.0)
                times.append(time.perf_counter() - began)
                study.tell(trial, (x - 0.3) ** 2)
            rows.append({"sampler": label, "trials": size,
                         "ask_ms_p50": _ms(times, 50), "ask_ms_p95": _ms(times, 95)})
    return rows


def _search_sampler() -> optuna.samplers.BaseSampler:
    from search.spec import load_spec
    from search.study import make_sampler

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec_for("tpe-cost"), sort_keys=False))
        return make_sampler(load_spec(path), seed=0)


def parse_rows(text: str) -> list[tuple[int, int]]:
    rows = []
    for item in text.split(","):
        workers, _, prefill = item.partition("@")
        rows.append((int(workers), int(prefill or 0)))
    return rows


def ensure_database(storage: str) -> None:
    url = normalize_url(storage)
    base, database = url.rsplit("/", 1)
    engine = sqlalchemy.create_engine(base + "/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        exists = connection.execute(
            sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}
        ).scalar()
        if not exists:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    engine.dispose()
    optuna.storages.RDBStorage(url)  # creates Optuna's tables once, before any worker races


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Command: `{results['command']}`  ",
        f"Commit: `{results['commit']}`; {results['started']} UTC; epoch {results['epoch_s']} s, "
        f"{EPOCHS} epochs a trial, window {results['window_s']:.0f} s per system per pair; "
        f"load average before {results['uptime_before']}, after {results['uptime_after']} "
        f"({os.cpu_count()} cores, shared with other agents).",
        "",
        "| workers | trials before | pair | search epochs/min (lost) | plain epochs/min (lost) "
        "| ratio | per-epoch call p50/p95 ms (CPU p50) search · plain | gap between trials "
        "p50/p95 s search · plain | join p50/max s search · plain | max connections "
        "search / plain | errors search / plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        s, p = row["search"], row["plain"]
        if s.get("skipped"):
            lines.append(
                f"| {row['workers']} | {row['prefill']:,} | {row['pair']} | {s['skipped']} | "
                f"{p['epochs_per_min']:,} ({p['time_lost']:.0%}) | — | — · {_call(p)} | "
                f"— · {_gap(p)} | — · {_join(p)} | — / {p['max_connections']} | — / "
                f"{p['errors']} |")
            continue
        ratio = s["epochs_per_min"] / p["epochs_per_min"] if p["epochs_per_min"] else float("nan")
        lines.append(
            f"| {row['workers']} | {row['prefill']:,} | {row['pair']} | "
            f"{s['epochs_per_min']:,} ({s['time_lost']:.0%}) | "
            f"{p['epochs_per_min']:,} ({p['time_lost']:.0%}) | {ratio:.2f}× | "
            f"{_call(s)} · {_call(p)} | {_gap(s)} · {_gap(p)} | {_join(s)} · {_join(p)} | "
            f"{s['max_connections']} / {p['max_connections']} | {s['errors']} / {p['errors']} |")
    profiled = [r for r in results["rows"] if any(r[x].get("profile") for x in SYSTEMS)]
    for row in [r for r in profiled if r["workers"] == 16 and not r["prefill"]][:1]:
        for system in SYSTEMS:
            top = row[system].get("profile")
            if not top:
                continue
            lines += ["", f"py-spy of one {system} worker, {row['workers']} workers, "
                      f"{row['prefill']:,} trials before (% of its non-idle samples: "
                      "inside / itself):", "", "| function | inside % | itself % |",
                      "|---|---|---|"]
            shown = [r for r in top if r[1] < 80][:15]  # skip the entry-point wrappers
            lines += [f"| `{name}` | {inside} | {itself} |" for name, inside, itself in shown]
    if results.get("tpe_cost"):
        lines += ["", "TPE `ask` + suggest, in-memory study (the sampler alone):", "",
                  "| sampler | finished trials | p50 ms | p95 ms |", "|---|---|---|---|"]
        for row in results["tpe_cost"]:
            lines.append(f"| {row['sampler']} | {row['trials']:,} | {row['ask_ms_p50']} | "
                         f"{row['ask_ms_p95']} |")
    return "\n".join(lines)


def _call(r: dict[str, Any]) -> str:
    return f"{r['call_ms_p50']}/{r['call_ms_p95']} ({r['call_cpu_ms_p50']})"


def _gap(r: dict[str, Any]) -> str:
    return f"{r['gap_s_p50']}/{r['gap_s_p95']}"


def _join(r: dict[str, Any]) -> str:
    return f"{r['join_s_p50']}/{r['join_s_max']}"


def write_results_md(label: str, body: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Coordination benchmark results\n"
    heading = f"## {label}"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = f"{heading}\n\n{body}\n\n"
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + section)
    path.write_text(text.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16,32,16@5000",
                        help="comma list of WORKERS or WORKERS@PREFILLED_TRIALS")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--epoch-seconds", type=float, default=0.05)
    parser.add_argument("--storage", default=DEFAULT_STORAGE)
    parser.add_argument("--label", default="latest",
                        help="names results-LABEL.json and the RESULTS.md section")
    parser.add_argument("--title", default=None, help="the RESULTS.md heading (default LABEL)")
    parser.add_argument("--tpe-cost", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy one worker of each system per measurement (CPU samples)")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to results-LABEL.json instead of starting it anew")
    parser.add_argument("--reserve", type=int, default=5,
                        help="connections to leave free for others on the shared server")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite RESULTS.md from results-LABEL.json")
    args = parser.parse_args()
    if args.render:
        write_results_md(args.title or args.label,
                         markdown(json.loads((HERE / f"results-{args.label}.json").read_text())))
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ensure_database(args.storage)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    results: dict[str, Any] = {
        "command": "python benchmarks/coordination/bench.py " + " ".join(sys.argv[1:]),
        "commit": commit, "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "epoch_s": args.epoch_seconds, "window_s": args.window,
        "uptime_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "rows": [],
    }
    out = HERE / f"results-{args.label}.json"
    if args.append and out.exists():
        earlier = json.loads(out.read_text())
        results["rows"] = earlier["rows"]
        results["command"] = earlier["command"] + "` then `" + results["command"]
        results["uptime_before"] = earlier["uptime_before"] + "; " + results["uptime_before"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for index, (n, prefill) in enumerate(parse_rows(args.rows)):
            for pair in range(args.pairs):
                order = SYSTEMS if (index + pair) % 2 == 0 else SYSTEMS[::-1]
                row: dict[str, Any] = {"workers": n, "prefill": prefill, "pair": pair + 1}
                for system in order:
                    need = connections_needed(system, n)
                    headroom = server_headroom(args.storage) - args.reserve
                    if need > headroom:
                        row[system] = {"skipped": f"not run: needs ~{need} connections, "
                                                  f"{headroom} free"}
                        print(f"{system} x{n}: {row[system]['skipped']}", flush=True)
                        continue
                    spy = workdir / f"{system}-{n}-{prefill}-{pair}.spy" if args.profile else None
                    row[system] = measure(system, n, prefill=prefill, storage=args.storage,
                                          window=args.window, epoch_seconds=args.epoch_seconds,
                                          workdir=workdir, profile=spy)
                    if spy is not None and spy.exists():
                        row[system]["profile"] = summarize_profile(spy)
                    print(json.dumps(row[system]), flush=True)
                results["rows"].append(row)
                out.write_text(json.dumps(results, indent=1))
    if args.tpe_cost:
        results["tpe_cost"] = tpe_cost([1000, 5000])
    results["uptime_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out.write_text(json.dumps(results, indent=1))
    body = markdown(results)
    print(body)
    write_results_md(args.title or args.label, body)


if __name__ == "__main__":
    main()
