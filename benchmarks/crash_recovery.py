"""Crash recovery under chaos: random `kill -9`s of 16 workers in one PostgreSQL study.

Creates a fresh study whose objective sleeps per epoch (`benchmarks/sleepy_objective.py`, a
stand-in GPU job, so CPU is not the limit), starts `--workers` real `search worker`
processes, and SIGKILLs a random busy worker every `--kill-every` seconds (on average) until
`--kills` kills are done, starting a replacement after each one as a supervisor would. When the
study is done and every worker has exited, it reads the database and reports:

- finished trials (COMPLETE + PRUNED) against the budget (must be equal), trials left RUNNING
  or WAITING (must be 0), and trials lost (must be 0): retry chains (a trial and its retries,
  Optuna's `failed_trial`) without a finished trial, except chains whose trials the benchmark
  killed more than `max_retries` times, counted apart as abandoned (by design);
- kills, retries, trials failed while their worker lived (reaped on a late heartbeat), and
  the time from a kill to its retry starting;
- simulated GPU-seconds: spent (every epoch begun, the epoch in flight at a kill counted up
  to the kill), useful (the epochs behind the finished trials), and lost = spent - useful,
  split into the epochs in flight at a kill and completed epochs that had to be redone;
- the peak number of PostgreSQL connections the workers held, in all and per worker.

It does this twice, with `--checkpoint-dir` (retries resume) and without (retries start
over), and prints both in one table. Seeded kills are reproducible only up to timing.

    psql -h 127.0.0.1 -U postgres -c 'create database bench'   # once
    python benchmarks/crash_recovery.py --storage postgresql://postgres@127.0.0.1:5432/bench

Exits 1 when either run breaks an invariant (budget met exactly; nothing RUNNING, WAITING or
lost; no trial finished twice or without its full curve of epochs; no worker crashed; at
most 4 connections per worker).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState
from rich import box
from rich.console import Console
from rich.table import Table

from search.spec import spec_from_dict
from search.storage import normalize_url, open_storage
from search.study import create_or_load_study

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CONNECTIONS_PER_WORKER = 4  # search.storage: pool of 3 + 1 overflow


@dataclass(frozen=True)
class Config:
    storage: str
    workers: int
    trials: int
    epochs: int
    epoch_seconds: float
    kills: int
    kill_every: float
    seed: int
    heartbeat: int
    grace: int
    max_retries: int
    timeout: float
    stall: float


@dataclass(frozen=True)
class Kill:
    at: float  # time.time() right after the SIGKILL
    worker_id: str
    pid: int


@dataclass
class Outcome:
    label: str
    study: str
    ending: str
    wall: float
    startup: float
    figures: dict[str, float | int | str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Fleet:
    """The study's worker processes: start, kill -9, replace, stop."""

    def __init__(self, study: str, config: Config, run_dir: Path, *, checkpoint: bool) -> None:
        self.study = study
        self.tag = f"cb{uuid.uuid4().hex[:6]}"
        self.logs = run_dir / "logs"
        self.logs.mkdir()
        self.checkpoint_dir = run_dir / "checkpoints" if checkpoint else None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills: list[Kill] = []
        self.stopped: set[str] = set()
        pythonpath = [str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]
        self.env = {
            **os.environ,
            "SEARCH_STORAGE": config.storage,
            "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p),
            "PYTHONUNBUFFERED": "1",
            "CRASH_BENCH_EPOCH_SECONDS": str(config.epoch_seconds),
            "CRASH_BENCH_LEDGER": str(run_dir / "ledger"),
        }
        (run_dir / "ledger").mkdir()

    def start(self) -> str:
        worker_id = f"w{len(self.procs):02d}"
        command = [sys.executable, "-m", "search", "worker", self.study, "--worker-id", worker_id]
        if self.checkpoint_dir is not None:
            command += ["--checkpoint-dir", str(self.checkpoint_dir)]
        with (self.logs / f"{worker_id}.log").open("wb") as log:
            self.procs[worker_id] = subprocess.Popen(
                command,
                env={**self.env, "PGAPPNAME": f"{self.tag}-{worker_id}"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return worker_id

    def live(self) -> dict[str, int]:
        return {w: p.pid for w, p in self.procs.items() if p.poll() is None}

    def kill(self, worker_id: str) -> Kill:
        proc = self.procs[worker_id]
        proc.send_signal(signal.SIGKILL)
        kill = Kill(time.time(), worker_id, proc.pid)
        proc.wait()
        self.kills.append(kill)
        return kill

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every live worker (it hands its trial back), SIGKILL what is left."""
        self.stopped = set(self.live())
        for worker_id in self.stopped:
            self.procs[worker_id].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def unexpected_exits(self) -> dict[str, int]:
        killed = {k.worker_id for k in self.kills} | self.stopped
        return {
            w: p.returncode
            for w, p in self.procs.items()
            if w not in killed and p.returncode not in (0, None)
        }


class ConnectionSampler(threading.Thread):
    """Samples pg_stat_activity for the fleet's connections (application_name = tag-worker)."""

    def __init__(self, url: str, tag: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="connections")
        self.engine = sqlalchemy.create_engine(normalize_url(url), isolation_level="AUTOCOMMIT")
        self.tag = tag
        self.interval = interval
        self.halt = threading.Event()
        self.peak_total = 0
        self.workers_at_peak = 0
        self.peak_one_worker = 0
        self.samples = 0

    def run(self) -> None:
        query = sqlalchemy.text(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE :p GROUP BY 1"
        )
        with self.engine.connect() as connection:
            while not self.halt.wait(self.interval):
                per_worker = dict(connection.execute(query, {"p": f"{self.tag}-%"}).all())
                total = sum(per_worker.values())
                self.samples += 1
                if total > self.peak_total:
                    self.peak_total, self.workers_at_peak = total, len(per_worker)
                self.peak_one_worker = max(self.peak_one_worker, *per_worker.values(), 0)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)
        self.engine.dispose()


def study_spec(name: str, config: Config) -> dict:
    return {
        "name": name,
        "direction": "minimize",
        "metric": "val_loss",
        "n_trials": config.trials,
        "epochs": config.epochs,
        "seed": config.seed,
        "sampler": {"type": "random"},  # cheap asks: 16 workers share 2 cores
        "pruning": {"pruner": "none"},  # every trial runs all epochs: comparable GPU-time
        "space": {"x": {"type": "float", "low": -1.0, "high": 1.0}},
        "objective": {"function": "sleepy_objective:train"},
        "workers": {
            "heartbeat_interval": config.heartbeat,
            "grace_period": config.grace,
            "max_retries": config.max_retries,
        },
    }


def run_once(config: Config, *, checkpoint: bool, keep: bool) -> Outcome:
    label = "with checkpoint resume" if checkpoint else "without checkpoints"
    name = f"crash-{'ckpt' if checkpoint else 'nockpt'}-{uuid.uuid4().hex[:8]}"
    run_dir = Path(tempfile.mkdtemp(prefix="crash-bench-"))
    print(f"\n== {label}: study {name}, files in {run_dir}", flush=True)
    keep_files = keep
    try:
        create_or_load_study(
            spec_from_dict(study_spec(name, config)), open_storage(config.storage)
        )
        study = optuna.load_study(study_name=name, storage=open_storage(config.storage))
        fleet = Fleet(name, config, run_dir, checkpoint=checkpoint)
        sampler = ConnectionSampler(config.storage, fleet.tag)
        began = time.monotonic()
        try:
            sampler.start()
            for _ in range(config.workers):
                fleet.start()
            ending, startup = chaos(study, fleet, config, random.Random(config.seed), began)
        finally:
            fleet.stop()
            sampler.stop()
        outcome = Outcome(label, name, ending, time.monotonic() - began, startup)
        analyse(outcome, study, fleet, sampler, config, run_dir / "ledger")
        for n, worker_id in enumerate(fleet.unexpected_exits()):
            tail = (fleet.logs / f"{worker_id}.log").read_text(errors="replace").strip()
            print(f"-- {worker_id} crashed: " + (tail[-1500:] if n == 0 else tail[-200:]))
        keep_files = keep or bool(outcome.problems)
        return outcome
    finally:
        if keep_files:
            print(f"kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def chaos(
    study: optuna.Study, fleet: Fleet, config: Config, rng: random.Random, began: float
) -> tuple[str, float]:
    """Kill and replace workers until the study is done and every worker has exited.

    Returns how the run ended and the seconds until the first epoch was reported.
    """
    next_kill: float | None = None
    first_epoch: float | None = None
    last_finished, last_progress, last_print = -1, began, began
    while True:
        now = time.monotonic()
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if first_epoch is None and any(t.intermediate_values for t in trials):
            first_epoch = last_progress = now
        if finished != last_finished:
            last_finished, last_progress = finished, now
        live = fleet.live()
        startup = (first_epoch or now) - began
        if not live:
            return ("done" if finished >= config.trials else "workers exited early"), startup
        if now - began > config.timeout:
            return f"timed out after {config.timeout:.0f} s", startup
        if first_epoch is not None and now - last_progress > config.stall:
            return f"stalled: no trial finished for {config.stall:.0f} s", startup
        if now - last_print >= 10:
            print(
                f"t={now - began:5.1f}s finished {finished}/{config.trials}, "
                f"running {len(running)}, workers {len(live)}, kills {len(fleet.kills)}",
                flush=True,
            )
            last_print = now
        if finished < config.trials and len(fleet.kills) < config.kills:
            if next_kill is None and first_epoch is not None:
                next_kill = now + rng.uniform(0.5, 1.5) * config.kill_every
            in_trial = {t.user_attrs.get("pid"): t for t in running}
            busy = sorted(w for w, pid in live.items() if pid in in_trial)
            if next_kill is not None and now >= next_kill and busy:  # else: at the next poll
                victim = rng.choice(busy)
                kill = fleet.kill(victim)
                trial = in_trial[kill.pid]
                print(
                    f"t={now - began:5.1f}s kill -9 {victim} (pid {kill.pid}, trial "
                    f"{trial.number} after epoch {len(trial.intermediate_values)}); "
                    f"started {fleet.start()}",
                    flush=True,
                )
                next_kill = now + rng.uniform(0.5, 1.5) * config.kill_every
        time.sleep(0.5)


def killed_attempts(trials: list[FrozenTrial], kills: list[Kill]) -> dict[int, Kill]:
    """The trial each kill interrupted: its worker's trial that was running at that moment."""
    hit: dict[int, Kill] = {}
    for kill in kills:
        for trial in trials:
            started = trial.datetime_start.timestamp() if trial.datetime_start else None
            ended = trial.datetime_complete.timestamp() if trial.datetime_complete else None
            if (
                trial.user_attrs.get("pid") == kill.pid
                and started is not None
                and started <= kill.at
                and (ended is None or ended >= kill.at)
            ):
                hit[trial.number] = kill
    return hit


def gpu_ledger(ledger: Path, kills: list[Kill], epoch_seconds: float) -> tuple[int, float]:
    """Epochs that ran to the end, and the GPU-seconds of epochs cut short by a kill."""
    killed_at = {k.pid: k.at for k in kills}
    completed, cut_short = 0, 0.0
    for path in ledger.glob("*.log"):
        starts = sorted(float(line.split()[0]) for line in path.read_text().splitlines())
        kill = killed_at.get(int(path.stem))
        if starts and kill is not None and kill - starts[-1] < epoch_seconds:
            cut_short += max(0.0, kill - starts[-1])
            starts.pop()
        completed += len(starts)
    return completed, cut_short


def orphans(url: str, study: str) -> list[str]:
    """RUNNING trials and whether they ever had a heartbeat (the reaper skips those without)."""
    engine = sqlalchemy.create_engine(normalize_url(url))
    with engine.connect() as connection:
        rows = connection.execute(
            sqlalchemy.text(
                "SELECT t.number, h.heartbeat FROM trials t JOIN studies s USING (study_id) "
                "LEFT JOIN trial_heartbeats h USING (trial_id) "
                "WHERE s.study_name = :n AND t.state = 'RUNNING' ORDER BY t.number"
            ),
            {"n": study},
        ).all()
    engine.dispose()
    return [
        f"trial {n} ({'last heartbeat ' + str(h) if h else 'never had a heartbeat'})"
        for n, h in rows
    ]


def analyse(
    outcome: Outcome,
    study: optuna.Study,
    fleet: Fleet,
    sampler: ConnectionSampler,
    config: Config,
    ledger: Path,
) -> None:
    trials = study.get_trials()
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    finished = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    hit = killed_attempts(trials, fleet.kills)
    chains: dict[int, list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        chains[int(trial.system_attrs.get("failed_trial", trial.number))].append(trial)
    lost, abandoned, doubled = [], [], []
    for root, chain in sorted(chains.items()):
        done = [t for t in chain if t.state in FINISHED]
        doubled += [root] if len(done) > 1 else []
        if done:
            continue
        killed = sum(t.number in hit for t in chain)
        (abandoned if killed > config.max_retries else lost).append(root)
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    recovery = [
        t.datetime_start.timestamp() - hit[t.user_attrs["retry_of"]].at
        for t in retries
        if t.user_attrs["retry_of"] in hit and t.datetime_start is not None
    ]
    full_curve = set(range(1, config.epochs + 1))  # the study never prunes or stops early
    gaps = [
        t.number
        for t in trials
        if t.state in FINISHED and t.intermediate_values.keys() != full_curve
    ]
    resumed = [int(t.user_attrs.get("resumed_from_epoch", 0)) for t in retries]
    e = config.epoch_seconds
    completed, cut_short = gpu_ledger(ledger, fleet.kills, e)
    useful = sum(max(t.intermediate_values, default=0) for t in trials if t.state in FINISHED)
    spent = completed * e + cut_short
    lost_gpu = spent - useful * e
    dropped = [t for t in trials if t.state == TrialState.FAIL and t.number not in hit]
    outcome.figures = {
        "workers (at once)": config.workers,
        "kills (-9) / of them mid-trial": f"{len(fleet.kills)} / {len(hit)}",
        "budget (n_trials)": config.trials,
        "finished (COMPLETE + PRUNED)": finished,
        "left RUNNING / WAITING": f"{count[TrialState.RUNNING]} / {count[TrialState.WAITING]}",
        "trials lost": len(lost),
        "abandoned after max_retries": len(abandoned),
        "chains finished twice": len(doubled),
        "finished without the full curve": len(gaps),
        "trials started (all states)": len(trials),
        "retries queued": len(retries),
        "most retries used by one trial": max(
            (int(t.system_attrs.get("crash_retries", 0)) for t in trials), default=0
        ),
        "failed while the worker lived": len(dropped),
        "workers crashed (exit != 0, not killed)": len(fleet.unexpected_exits()),
        "retries resumed from epoch (mean)": round(statistics.fmean(resumed), 2) if resumed else 0,
        "kill -> retry started, mean / max (s)": (
            f"{statistics.fmean(recovery):.1f} / {max(recovery):.1f}" if recovery else "-"
        ),
        "GPU-s spent": round(spent, 1),
        "GPU-s in finished trials": round(useful * e, 1),
        "GPU-s lost to crashes": round(lost_gpu, 1),
        "  of it: epochs in flight at a kill": round(cut_short, 1),
        "  of it: completed epochs redone": round(lost_gpu - cut_short, 1),
        "GPU-s lost / spent": f"{100 * lost_gpu / spent:.1f} %" if spent else "-",
        "wall time (s)": round(outcome.wall, 1),
        "  of it: start until the first epoch": round(outcome.startup, 1),
        "peak connections (all workers)": sampler.peak_total,
        "peak connections of one worker": sampler.peak_one_worker,
        "connections per live worker at peak": (
            round(sampler.peak_total / sampler.workers_at_peak, 2)
            if sampler.workers_at_peak
            else "-"
        ),
    }
    problems = outcome.problems
    if outcome.ending != "done":
        problems.append(f"run ended: {outcome.ending}")
    if finished != config.trials:
        problems.append(f"{finished} finished trials, budget {config.trials}")
    if count[TrialState.RUNNING] or count[TrialState.WAITING]:
        problems.append(
            f"left RUNNING: {orphans(config.storage, study.study_name)}, "
            f"WAITING: {count[TrialState.WAITING]}"
        )
    if lost:
        problems.append(
            "lost chains (root trial, states): "
            + "; ".join(f"{r}: {[(t.number, t.state.name) for t in chains[r]]}" for r in lost)
        )
    if doubled:
        problems.append(f"retry chains with two finished trials (roots): {doubled}")
    if gaps:
        problems.append(f"finished trials without epochs 1..{config.epochs}: {gaps}")
    if sampler.peak_one_worker > CONNECTIONS_PER_WORKER:
        problems.append(f"a worker held {sampler.peak_one_worker} connections")
    if fleet.unexpected_exits():
        problems.append(f"workers crashed (exit codes): {fleet.unexpected_exits()}")
    if dropped:
        print(
            "failed while alive: "
            + ", ".join(f"{t.number} ({t.user_attrs.get('worker', '?')})" for t in dropped)
        )


def table(outcomes: list[Outcome]) -> Table:
    out = Table(box=box.MARKDOWN, title=None)
    out.add_column("")
    for outcome in outcomes:
        out.add_column(outcome.label, justify="right")
    if len(outcomes) == 2:
        out.add_column("without / with", justify="right")
    for key in outcomes[0].figures:
        values = [o.figures[key] for o in outcomes]
        ratio = ""
        if len(values) == 2 and key in ("GPU-s lost to crashes", "wall time (s)", "GPU-s spent"):
            with_, without = (float(v) for v in values)
            ratio = f"{without / with_:.2f}x" if with_ else "-"
        out.add_row(key, *(str(v) for v in values), *([ratio] if len(values) == 2 else []))
    return out


def postgres_facts(url: str, workers: int) -> dict[str, str]:
    engine = sqlalchemy.create_engine(normalize_url(url))
    with engine.connect() as connection:
        limit = int(connection.execute(sqlalchemy.text("SHOW max_connections")).scalar_one())
        used = int(
            connection.execute(
                sqlalchemy.text("SELECT count(*) FROM pg_stat_activity")
            ).scalar_one()
        )
        version = str(connection.execute(sqlalchemy.text("SHOW server_version")).scalar_one())
    engine.dispose()
    need = CONNECTIONS_PER_WORKER * (workers + 1) + 4  # + a replacement overlap, + us
    if used + need > limit:
        raise SystemExit(
            f"PostgreSQL allows {limit} connections and {used} are in use; {workers} workers "
            f"may need {need}. Use fewer --workers or raise max_connections."
        )
    return {"max_connections": str(limit), "in use before": str(used), "version": version}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="postgresql://postgres@127.0.0.1:5432/bench")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--epoch-seconds", type=float, default=1.0)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--kill-every", type=float, default=3.0, help="mean seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heartbeat-interval", type=int, default=1)
    parser.add_argument("--grace-period", type=int, default=5)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument(
        "--stall",
        type=float,
        default=60.0,
        help="end a run when no trial finishes for this long after the first epoch",
    )
    parser.add_argument("--only", choices=["with", "without"], help="one of the two runs")
    parser.add_argument("--results", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--keep", action="store_true", help="keep logs, ledgers, checkpoints")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up workers on SIGTERM
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = Config(
        args.storage,
        args.workers,
        args.trials,
        args.epochs,
        args.epoch_seconds,
        args.kills,
        args.kill_every,
        args.seed,
        args.heartbeat_interval,
        args.grace_period,
        args.max_retries,
        args.timeout,
        args.stall,
    )
    facts = postgres_facts(config.storage, config.workers)
    modes = [m for m in (True, False) if args.only in (None, "with" if m else "without")]
    outcomes = [run_once(config, checkpoint=m, keep=args.keep) for m in modes]
    console = Console(width=130)
    summary = table(outcomes)
    console.print(summary)
    for outcome in outcomes:
        for problem in outcome.problems:
            console.print(f"[bold red]{outcome.label}: {problem}[/]")
    if args.results:
        write_results(args.results, config, facts, summary, outcomes)
    return 1 if any(o.problems for o in outcomes) else 0


DEFINITIONS = """\
How the figures are defined:

- *trials lost*: retry chains (a trial and the retries queued for it) with no COMPLETE or
  PRUNED trial, unless the benchmark killed more than `max_retries` of its trials; those are
  *abandoned* (by design). A retry also used up by a failure without a kill makes a loss.
- *without the full curve*: finished trials whose intermediate values are not exactly epochs
  1..N (the study never prunes or stops early, so each must have all of them).
- *mid-trial kills*: kills whose worker had a RUNNING trial at that moment (matched by pid).
- *failed while the worker lived*: trials reaped although their worker was not killed (a late
  heartbeat); the worker drops such a trial at its next epoch.
- *GPU-s spent*: every epoch begun, from the objective's own log of epoch starts; the epoch a
  kill cut short counts up to the kill. *In finished trials*: the epochs behind each finished
  trial's last reported epoch. *Lost* = spent - in finished trials: the epochs cut short by a
  kill plus completed epochs that a retry computed again (without checkpoints, every epoch
  of a killed trial).
- *connections*: `pg_stat_activity` rows of the workers (each sets its own
  `application_name`), sampled every 0.5 s.
"""


def write_results(
    path: Path, config: Config, facts: dict[str, str], summary: Table, outcomes: list[Outcome]
) -> None:
    buffer = io.StringIO()
    Console(file=buffer, width=130, color_system=None).print(summary)
    command = "python benchmarks/crash_recovery.py " + " ".join(sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    problems = [f"- {o.label}: {p}" for o in outcomes for p in o.problems] or ["- none"]
    path.write_text(
        "# Crash recovery under random kill -9 (GitHub issue 4)\n\n"
        f"```bash\n{command}\n```\n\n"
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (load average at the end "
        f"{load}), PostgreSQL {facts['version']} on 127.0.0.1 (max_connections "
        f"{facts['max_connections']}). {config.workers} workers, {config.trials} trials of "
        f"{config.epochs} epochs x {config.epoch_seconds} s (sleep), heartbeat every "
        f"{config.heartbeat} s, grace period {config.grace} s, max_retries "
        f"{config.max_retries}, {config.kills} kills about every {config.kill_every} s, "
        f"seed {config.seed}. Studies: {', '.join(o.study for o in outcomes)}.\n\n"
        f"{buffer.getvalue().strip()}\n\nProblems found by the run:\n\n"
        + "\n".join(problems)
        + "\n\n"
        + DEFINITIONS
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
