"""Workers as real processes on the real PostgreSQL: budget, kill -9, SIGTERM, faults, OOM."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import (
    assert_exact_budget,
    load_trials,
    running_with_epochs,
    sleepy_spec,
    start_worker,
    wait_for,
    worker_log,
)
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from search import record
from search.spec import spec_from_dict
from search.storage import normalize_url, open_storage
from search.study import create_or_load_study

pytestmark = pytest.mark.slow


def _create(url: str, spec: dict) -> optuna.Study:
    return create_or_load_study(spec_from_dict(spec), open_storage(url))


def test_four_workers_finish_exactly_n_with_distinct_params(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    sampler = {"type": "tpe", "n_startup_trials": 3, "start": "defaults"}
    _create(pg_url, sleepy_spec(study_name, n_trials=13, epochs=2, sampler=sampler))
    workers = [
        start_worker(study_name, pg_url, tmp_path, f"w{i}", epoch_seconds=0.1) for i in range(4)
    ]
    codes = [w.wait(timeout=180) for w in workers]
    assert codes == [0, 0, 0, 0], [worker_log(tmp_path, f"w{i}")[-2000:] for i in range(4)]
    trials = assert_exact_budget(pg_url, study_name, 13).trials
    assert len(trials) == 13, "no surplus trial was started"
    assert len({t.params["x"] for t in trials}) == 13, "seeded workers repeated parameters"
    assert len({t.user_attrs["worker"] for t in trials}) >= 3
    started = [t for t in trials if t.user_attrs.get(record.START)]
    assert [(t.number, t.params) for t in started] == [(0, {"x": 0.0})], "one start, run first"


def test_kill_9_mid_trial_is_reaped_and_resumed_from_checkpoint(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    grace = 4
    _create(
        pg_url,
        sleepy_spec(
            study_name,
            n_trials=3,
            epochs=6,
            workers={"heartbeat_interval": 1, "grace_period": grace},
        ),
    )
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    victim = start_worker(study_name, pg_url, tmp_path, "victim", *ckpt, epoch_seconds=0.5)
    doomed = wait_for(
        lambda: running_with_epochs(pg_url, study_name, 3), 60, "a trial 3 epochs in"
    )
    assert isinstance(doomed, optuna.trial.FrozenTrial)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    rescuer = start_worker(study_name, pg_url, tmp_path, "rescuer", *ckpt, epoch_seconds=0.5)

    def failed() -> bool:
        return any(
            t.number == doomed.number and t.state == TrialState.FAIL
            for t in load_trials(pg_url, study_name)
        )

    wait_for(failed, 60, "the killed trial to be failed")
    assert rescuer.wait(timeout=120) == 0, worker_log(tmp_path, "rescuer")[-3000:]
    trials = assert_exact_budget(pg_url, study_name, 3).trials
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == doomed.number)
    assert retry.state == TrialState.COMPLETE
    assert retry.params == doomed.params
    assert retry.system_attrs["retry_history"] == [doomed.number]
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= 3
    assert sorted(retry.intermediate_values) == list(range(1, 7)), "earlier epochs kept"
    first_new = next(r for r in retry.user_attrs["epoch_metrics"] if r["epoch"] == resumed + 1)
    assert first_new["started_at_epoch"] == resumed, "training resumed, did not start over"


def test_worker_survives_its_live_trial_being_failed_by_another_process(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    _create(pg_url, sleepy_spec(study_name, n_trials=3, epochs=20))
    worker = start_worker(study_name, pg_url, tmp_path, "w", epoch_seconds=0.2)
    live = wait_for(lambda: running_with_epochs(pg_url, study_name, 1), 60, "a running trial")
    assert isinstance(live, optuna.trial.FrozenTrial)
    open_storage(pg_url).set_trial_state_values(live._trial_id, TrialState.FAIL)
    assert worker.wait(timeout=120) == 0, worker_log(tmp_path, "w")[-3000:]
    assert f"Trial {live.number} dropped" in worker_log(tmp_path, "w")
    assert_exact_budget(pg_url, study_name, 3)


def test_sigterm_checkpoints_hands_the_trial_back_and_exits_0(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    _create(pg_url, sleepy_spec(study_name, n_trials=2, epochs=6))
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    worker = start_worker(study_name, pg_url, tmp_path, "w", *ckpt, epoch_seconds=0.5)
    live = wait_for(lambda: running_with_epochs(pg_url, study_name, 2), 60, "a running trial")
    assert isinstance(live, optuna.trial.FrozenTrial)
    began = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert time.monotonic() - began < 10, "stopped at the next epoch boundary"
    trials = load_trials(pg_url, study_name)
    handed = next(t for t in trials if t.number == live.number)
    assert handed.state == TrialState.FAIL
    assert handed.user_attrs["fail_reason"] == "preempted"
    assert [t.state for t in trials if t.user_attrs.get("retry_of") == live.number] == [
        TrialState.WAITING
    ]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    follower = start_worker(study_name, pg_url, tmp_path, "w2", *ckpt, epoch_seconds=0.2)
    assert follower.wait(timeout=120) == 0, worker_log(tmp_path, "w2")[-3000:]
    trials = assert_exact_budget(pg_url, study_name, 2).trials
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == live.number)
    assert retry.user_attrs["resumed_from_epoch"] >= 2


def test_terminated_connections_and_a_short_outage_do_not_kill_workers(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    target = make_url(pg_url)
    proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432))
    proxy.start()
    via_proxy = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    _create(via_proxy, sleepy_spec(study_name, n_trials=8, epochs=3))
    workers = [
        start_worker(study_name, via_proxy, tmp_path, f"w{i}", epoch_seconds=0.3) for i in range(2)
    ]
    try:
        wait_for(lambda: running_with_epochs(pg_url, study_name, 1), 60, "a running trial")
        engine = sqlalchemy.create_engine(normalize_url(pg_url))
        with engine.connect() as connection:
            killed = connection.execute(
                sqlalchemy.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND client_port IS NOT NULL AND backend_type = 'client backend'"
                )
            ).scalar()
        engine.dispose()
        assert killed and killed >= 2
        time.sleep(1.0)
        proxy.stop()  # the database "goes away" for a few seconds
        time.sleep(4.0)
        proxy.start()
        codes = [w.wait(timeout=180) for w in workers]
    finally:
        proxy.stop()
    assert codes == [0, 0], [worker_log(tmp_path, f"w{i}")[-3000:] for i in range(2)]
    assert_exact_budget(pg_url, study_name, 8)


def test_out_of_memory_is_recorded_infeasible_and_not_retried(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    # No GPU here: tests/objectives.py raises the real torch.cuda.OutOfMemoryError class for
    # big configs, as the CUDA allocator would.
    spec = sleepy_spec(
        study_name,
        n_trials=7,
        epochs=2,
        sampler={"type": "random"},
        objective={"function": "objectives:oom_when_big"},
        space={"batch_size": {"choices": [16, 64]}, "width": {"choices": [64]}},
    )
    _create(pg_url, spec)
    worker = start_worker(study_name, pg_url, tmp_path, "w")
    assert worker.wait(timeout=120) == 0, worker_log(tmp_path, "w")[-3000:]
    trials = assert_exact_budget(pg_url, study_name, 7).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    oom = [t for t in failed if t.user_attrs["fail_reason"] == "oom"]
    assert len(oom) == 1, "the first OOM is run; larger configs are skipped afterwards"
    assert oom[0].user_attrs["oom_config"] == {"batch_size": 64, "width": oom[0].params["width"]}
    assert oom[0].system_attrs["constraints:diverged"] == 1.0
    for trial in failed:
        if trial is not oom[0]:
            assert trial.user_attrs["fail_reason"].startswith("oom-skip")
            assert trial.params["batch_size"] >= 64
            assert trial.params["width"] >= oom[0].params["width"]
    assert "ran out of memory" in worker_log(tmp_path, "w")


def test_out_of_memory_retried_with_accumulation_keeps_the_batch_size(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    # Simulated OOM (no GPU here): the objective raises torch.cuda.OutOfMemoryError for
    # micro-batches of 128 or more.
    spec = sleepy_spec(
        study_name,
        n_trials=2,
        epochs=2,
        sampler={"type": "random"},
        objective={"function": "objectives:oom_unless_accumulated"},
        space={"batch_size": {"choices": [256]}, "width": {"choices": [64]}},
        workers={"heartbeat_interval": 1, "grace_period": 4, "oom_grad_accumulation": True},
    )
    _create(pg_url, spec)
    worker = start_worker(study_name, pg_url, tmp_path, "w")
    assert worker.wait(timeout=120) == 0, worker_log(tmp_path, "w")[-3000:]
    trials = assert_exact_budget(pg_url, study_name, 2).trials
    first = trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "oom"
    # 256 → micro-batches of 128 still run out; the next retry halves again to 64 and fits.
    retry = next(t for t in trials if t.state == TrialState.COMPLETE)
    assert retry.system_attrs["retry_history"] == [0, 1]
    assert trials[1].user_attrs["grad_accumulation"] == 2
    assert retry.params["batch_size"] == 256, "the searched batch size is never changed"
    assert retry.user_attrs["grad_accumulation"] == 4
    assert retry.user_attrs["epoch_metrics"][0]["accumulation"] == 4


def test_an_objective_that_always_fails_stops_the_worker_with_one_line(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    spec = sleepy_spec(study_name, n_trials=20, objective={"function": "objectives:broken"})
    spec["workers"] = {**spec["workers"], "max_failures": 3}
    _create(pg_url, spec)
    worker = start_worker(study_name, pg_url, tmp_path, "w")
    assert worker.wait(timeout=60) == 2
    log = worker_log(tmp_path, "w")
    assert "Error: 3 trials failed with errors (max_failures=3); the last: error: KeyError" in log
    trials = load_trials(pg_url, study_name)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3


def test_a_restarted_worker_with_the_same_name_repeats_no_parameters(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    # The sampler is seeded per trial (spec seed, trial number), not by the worker's name:
    # a seeded random sampler would otherwise replay its predecessor's draws exactly.
    _create(pg_url, sleepy_spec(study_name, n_trials=10, epochs=2, sampler={"type": "random"}))
    first = start_worker(study_name, pg_url, tmp_path, "w0", epoch_seconds=0.2)
    wait_for(
        lambda: sum(t.state == TrialState.COMPLETE for t in load_trials(pg_url, study_name)) >= 3,
        90,
        "three finished trials",
    )
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    again = start_worker(study_name, pg_url, tmp_path, "w0", epoch_seconds=0.2)
    assert again.wait(timeout=180) == 0, worker_log(tmp_path, "w0")[-3000:]
    trials = assert_exact_budget(pg_url, study_name, 10).trials
    # (a trial the kill caught between its claim and its sampling has no params)
    fresh = [t.params["x"] for t in trials if "retry_of" not in t.user_attrs and t.params]
    assert len(fresh) == len(set(fresh)), "a restart replayed parameters"
    assert len({t.user_attrs["pid"] for t in trials if "pid" in t.user_attrs}) == 2


def test_a_worker_holds_one_database_connection(
    pg_url: str, study_name: str, tmp_path: Path
) -> None:
    _create(pg_url, sleepy_spec(study_name, n_trials=3, epochs=8))
    worker = start_worker(study_name, pg_url, tmp_path, "w", epoch_seconds=0.3)
    engine = sqlalchemy.create_engine(normalize_url(pg_url))
    try:
        wait_for(lambda: running_with_epochs(pg_url, study_name, 1), 60, "a running trial")
        held = []
        with engine.connect() as connection:
            for _ in range(40):
                held.append(connection.execute(sqlalchemy.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                    {"name": f"search {os.uname().nodename}:{worker.pid}"}).scalar())
                time.sleep(0.1)
        assert max(held) == 1, held
    finally:
        engine.dispose()
    assert worker.wait(timeout=120) == 0, worker_log(tmp_path, "w")[-3000:]


def test_a_lone_worker_compares_each_trial_with_every_trial_before_it(
    sqlite_url: str, study_name: str
) -> None:
    """Other workers' trials reach the comparison within `PEER_STALENESS` seconds; this
    worker's own at once: with an hour's staleness, trial k still sees the k before it."""
    from study_factory import review_spec

    from search.worker import Worker

    spec = spec_from_dict(review_spec(study_name, n_trials=6), source="test")
    create_or_load_study(spec, open_storage(sqlite_url))
    worker = Worker(study_name, sqlite_url, worker_id="lone")
    worker.peers.staleness = 3600.0
    seen: dict[int, int] = {}
    current = worker.peers.current

    def spy() -> object:
        peers = current()
        assert worker._current is not None
        seen.setdefault(worker._current.number, peers.finished)
        return peers

    worker.peers.current = spy  # type: ignore[method-assign]
    worker.run()
    assert seen == {number: number for number in range(6)}
