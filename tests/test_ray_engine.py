"""Ray engine: the actor plan alone, then a real local multi-node Ray cluster.

The cluster is `ray.cluster_utils.Cluster`: real raylets, object stores and actor processes on
this machine, each node declaring 2 GPUs that do not exist (nothing touches CUDA; Ray still
assigns each actor its own GPU id through CUDA_VISIBLE_DEVICES, which the test objectives
record). The study lives in the real PostgreSQL. The tests share one cluster, in file order:
two nodes, a third joins, one is lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import REPO, TESTS, cli_env, exact_trials, sleepy_spec, wait_for
from optuna.trial import FrozenTrial, TrialState

from search import record
from search.ray_engine import ActorSlot, NodeInfo, RayFleet, plan_actors
from search.spec import load_spec
from search.storage import open_storage
from search.study import create_or_load_study

GPUS_PER_NODE = 2
MB = 1024 * 1024


# --- the plan, without Ray --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "per_gpu", "cap", "expected"),
    [
        # one actor per GPU of every node, each asking for a whole GPU and no CPU
        ([NodeInfo("b", 2, 8), NodeInfo("a", 1, 8)], 1, None, [("a", 0, 1, 0), ("b", 0, 1, 0),
                                                              ("b", 1, 1, 0)]),
        # K workers per GPU ask for 1/K GPU each
        ([NodeInfo("a", 1, 8)], 2, None, [("a", 0, 0.5, 0), ("a", 1, 0.5, 0)]),
        # a CPU-only node next to GPU nodes gets nothing
        ([NodeInfo("a", 0, 64), NodeInfo("b", 1, 4)], 1, None, [("b", 0, 1, 0)]),
        # no GPU anywhere: one CPU actor per 2 cores, at least one per node
        ([NodeInfo("a", 0, 5), NodeInfo("b", 0, 1)], 1, None, [("a", 0, 0, 2), ("a", 1, 0, 2),
                                                              ("b", 0, 0, 1)]),
        # --workers caps the total, filling nodes in id order
        ([NodeInfo("b", 4, 8), NodeInfo("a", 4, 8)], 1, 5, [("a", i, 1, 0) for i in range(4)]
         + [("b", 0, 1, 0)]),
    ],
)
def test_plan_keeps_one_actor_per_gpu_or_cpu_actors_without_gpus(
        nodes: list[NodeInfo], per_gpu: int, cap: int | None,
        expected: list[tuple[str, int, float, float]]) -> None:
    plan = plan_actors(nodes, workers_per_gpu=per_gpu, max_workers=cap)
    assert plan == [ActorSlot(*slot) for slot in expected]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"workers_per_gpu": 0}, "workers_per_gpu must be >= 1, but got workers_per_gpu=0"),
    ({"max_workers": 0}, "max_workers must be >= 1, but got max_workers=0"),
])
def test_plan_rejects_bad_counts(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_actors([NodeInfo("a", 1, 1)], **kwargs)


def test_actor_worker_ids_name_their_node() -> None:
    assert ActorSlot("0123456789abcdef", 3, 1, 0).worker_id == "ray-01234567-3"


_WITHOUT_RAY = "import sys; sys.modules['ray'] = None\n"


def test_package_and_cli_work_without_ray(tmp_path: Path) -> None:
    """`ray` stays optional: with it unimportable the package imports and --ray says how to
    install it, in one line, before touching the database."""
    code = _WITHOUT_RAY + (
        "import search, search.ray_engine, search.cli\n"
        "sys.argv = ['search', 'launch', sys.argv[1], '--ray', 'auto',"
        " '--storage', 'postgresql://nobody@127.0.0.1:1/none']\n"
        "search.cli.main()\n"
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(sleepy_spec("no-ray")))
    result = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True,
                            text=True, timeout=60, env=cli_env(), cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: --ray needs Ray, which is not installed: pip install 'gridfleet-search[ray]'"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_cluster_is_a_one_line_error(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(sleepy_spec("no-cluster")))
    address = f"127.0.0.1:{_free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "search", "launch", str(spec), "--ray", address,
         "--storage", f"sqlite:///{tmp_path / 'x.db'}"],
        capture_output=True, text=True, timeout=60, env=cli_env(), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot connect to the Ray cluster at '{address}'")
    assert not (tmp_path / "x.db").exists(), "nothing was written before connecting"


# --- a real Ray cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def hold_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """While this file exists, `objectives:held` trials wait before their first epoch."""
    return tmp_path_factory.mktemp("hold") / "hold"


@pytest.fixture(scope="module")
def cluster(crash_dir: Path, hold_file: Path) -> Iterator[Any]:
    """Two nodes with 2 fake GPUs each; GCS on a free port (Redis holds Ray's 6379)."""
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        # Raylets pass their environment on to the actor processes they start.
        env.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO)]))
        env.setenv("SEARCH_TEST_CRASH_DIR", str(crash_dir))
        env.setenv("SEARCH_TEST_HOLD_FILE", str(hold_file))
        env.setenv("RAY_DEDUP_LOGS", "0")
        node = {"num_cpus": 1, "num_gpus": GPUS_PER_NODE, "object_store_memory": 80 * MB}
        cluster = Cluster(initialize_head=True, head_node_args={
            **node, "redis_port": _free_port(), "include_dashboard": False,
            # notice a lost node within seconds (defaults: 30 s)
            "_system_config": {"health_check_period_ms": 1000,
                               "health_check_failure_threshold": 3,
                               "health_check_initial_delay_ms": 1000},
        })
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=True)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def _study(pg_url: str, study_name: str, tmp_path: Path, **overrides: Any) -> optuna.Study:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(sleepy_spec(study_name, **overrides)))
    return create_or_load_study(load_spec(path), open_storage(pg_url))


def _node_of(trial: FrozenTrial) -> str | None:
    """The node id prefix in a Ray worker id (`ray-<node>-<index>`); None before a worker
    recorded itself (a trial claimed a moment before its worker died)."""
    worker = trial.user_attrs.get(record.WORKER)
    return str(worker).split("-")[1] if worker else None


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    return wait_for(condition, timeout, what)


def _fleet_in_background(fleet: RayFleet) -> tuple[threading.Thread, list[Any]]:
    """Run the fleet from a thread: Ray adds and removes nodes only from the main thread."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(fleet.run(poll=0.5))
        except BaseException as e:  # reported by the test
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _finish(thread: threading.Thread, outcome: list[Any]) -> None:
    thread.join(180)
    assert not thread.is_alive(), "the fleet did not finish"
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert outcome[0].done


def _alive_node_ids() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


@pytest.mark.slow
def test_study_ends_at_exactly_n_with_one_actor_per_gpu_on_distinct_devices(
        cluster: Any, pg_url: str, study_name: str, tmp_path: Path) -> None:
    study = _study(pg_url, study_name, tmp_path, n_trials=8, epochs=2,
                   objective={"function": "objectives:env_probe"})
    fleet = RayFleet(study, pg_url)
    final = fleet.run(poll=0.5)
    assert final.done and final.finished == 8
    trials = exact_trials(study, 8)
    nodes = _alive_node_ids()
    assert len(nodes) == 2
    assert len(fleet.actors) == 2 * GPUS_PER_NODE, fleet.actors
    for node in nodes:
        seen = [a.cuda_visible_devices for a in fleet.actors.values() if a.node_id == node]
        assert sorted(seen) == ["0", "1"], f"each actor on node {node[:8]} has its own GPU"
    for trial in trials:
        actor = fleet.actors[trial.user_attrs[record.WORKER]]
        metrics = trial.user_attrs[record.EPOCH_METRICS][-1]
        assert metrics["gpu"] == float(actor.cuda_visible_devices or -1)
        assert metrics["cuda0"] == 1.0, "the worker trains on cuda:0, the one GPU it sees"


@pytest.mark.slow
def test_crashed_actor_is_restarted_in_place_and_its_trial_retried(
        cluster: Any, pg_url: str, study_name: str, tmp_path: Path) -> None:
    study = _study(pg_url, study_name, tmp_path, n_trials=6, epochs=3,
                   objective={"function": "objectives:exit_once"})
    fleet = RayFleet(study, pg_url, max_workers=2)
    assert fleet.run(poll=0.5).done
    trials = exact_trials(study, 6)
    crashed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(crashed) == 1
    assert crashed[0].user_attrs[record.FAIL_REASON] == record.Outcome.HEARTBEAT_LOST.value
    retry = next(t for t in trials if t.user_attrs.get(record.RETRY_OF) == crashed[0].number)
    # the retry runs to a verdict; the study's pruner may prune it against its peers
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED), retry.state
    worker = crashed[0].user_attrs[record.WORKER]
    assert fleet.runs[worker].pid != crashed[0].user_attrs[record.PID], (
        "Ray restarted the crashed actor in a new process and ran its loop to the end")
    assert not fleet.failures, "the restart happened inside Ray (max_restarts)"


@pytest.mark.slow
def test_recycled_actor_is_replaced_by_a_fresh_one_on_its_gpu(
        cluster: Any, pg_url: str, study_name: str, tmp_path: Path) -> None:
    """A worker that asks for a fresh process (here after each trial, `recycle_after: 1`; in
    practice after out-of-memory) returns; its actor is killed, freeing the GPU, and a new
    actor takes the same slot."""
    study = _study(pg_url, study_name, tmp_path, n_trials=4, epochs=1,
                   objective={"function": "objectives:env_probe"},
                   workers={"heartbeat_interval": 1, "grace_period": 4, "recycle_after": 1})
    fleet = RayFleet(study, pg_url, max_workers=2)
    assert fleet.run(poll=0.5).done
    trials = exact_trials(study, 4)
    assert not fleet.failures
    processes = Counter((t.user_attrs[record.WORKER], t.user_attrs[record.PID]) for t in trials)
    assert set(processes.values()) == {1}, "one trial per actor process"
    assert len({worker for worker, _ in processes}) <= 2, "the same two slots all along"


@pytest.mark.slow
def test_node_joining_mid_study_gets_actors(
        cluster: Any, pg_url: str, study_name: str, tmp_path: Path, hold_file: Path) -> None:
    hold_file.touch()  # the first actors' trials wait until the new node's actors run theirs
    study = _study(pg_url, study_name, tmp_path, n_trials=12, epochs=2,
                   objective={"function": "objectives:held"})
    before = _alive_node_ids()
    fleet = RayFleet(study, pg_url)
    thread, outcome = _fleet_in_background(fleet)
    try:
        _wait_for(lambda: len(study.get_trials(states=(TrialState.RUNNING,))) == 4,
                  "a trial on each GPU of the first two nodes")
        cluster.add_node(num_cpus=1, num_gpus=GPUS_PER_NODE, object_store_memory=80 * MB)
        (joined,) = _alive_node_ids() - before
        _wait_for(lambda: len(study.get_trials(states=(TrialState.RUNNING,))) == 6,
                  "the new node's actors to take trials")
    finally:
        hold_file.unlink()
    _finish(thread, outcome)
    trials = exact_trials(study, 12)
    newcomers = [a for a in fleet.actors.values() if a.node_id == joined]
    assert sorted(a.cuda_visible_devices for a in newcomers) == ["0", "1"]
    on_new_node = {t.user_attrs[record.WORKER] for t in trials if _node_of(t) == joined[:8]}
    assert on_new_node == {a.worker_id for a in newcomers}, "both new actors ran trials"


@pytest.mark.slow
def test_lost_node_trials_are_retried_on_the_others_with_nothing_lost(
        cluster: Any, pg_url: str, study_name: str, tmp_path: Path) -> None:
    import ray

    study = _study(pg_url, study_name, tmp_path, n_trials=12, epochs=6,
                   objective={"function": "objectives:env_probe"})
    head = ray.get_runtime_context().get_node_id()
    victim = next(n for n in cluster.list_all_nodes() if n.node_id != head)

    def running_on_victim() -> list[int]:
        return [t.number for t in study.get_trials(states=(TrialState.RUNNING,))
                if t.intermediate_values and _node_of(t) == victim.node_id[:8]]

    fleet = RayFleet(study, pg_url)
    thread, outcome = _fleet_in_background(fleet)
    lost = _wait_for(running_on_victim, "a trial under way on the victim node")
    cluster.remove_node(victim, allow_graceful=False)  # kill -9 its raylet and workers
    _finish(thread, outcome)
    assert victim.node_id not in _alive_node_ids()
    trials = exact_trials(study, 12)
    by_number = {t.number: t for t in trials}
    for number in lost:
        assert by_number[number].state == TrialState.FAIL
        assert by_number[number].user_attrs[record.FAIL_REASON] == (
            record.Outcome.HEARTBEAT_LOST.value)
        retries = [t for t in trials if t.user_attrs.get(record.RETRY_OF) == number]
        assert [t.state for t in retries] == [TrialState.COMPLETE]
        assert _node_of(retries[0]) != victim.node_id[:8], "retried on a surviving node"
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert set(failed) >= set(lost)
    assert {by_number[n].user_attrs[record.FAIL_REASON] for n in failed} == {
        record.Outcome.HEARTBEAT_LOST.value}


@pytest.mark.slow
def test_cli_driver_killed_and_started_again_continues_the_study(
        cluster: Any, pg_url: str, study_name: str, tmp_path: Path) -> None:
    """Nothing lives in Ray: kill -9 the `search launch --ray` driver (Ray then ends its
    actors), start it again, and the same study ends at exactly n_trials."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(sleepy_spec(
        study_name, n_trials=8, epochs=4, objective={"function": "objectives:env_probe"})))
    command = [sys.executable, "-m", "search", "launch", str(spec), "--storage", pg_url,
               "--no-progress", "--ray", cluster.address, "--workers", "2"]
    storage = open_storage(pg_url)
    first = subprocess.Popen(command, env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        def under_way() -> bool:
            with contextlib.suppress(KeyError):
                study = optuna.load_study(study_name=study_name, storage=storage)
                states = Counter(t.state for t in study.get_trials())
                return states[TrialState.COMPLETE] >= 2 and states[TrialState.RUNNING] >= 1
            return False

        _wait_for(under_way, "the first driver's actors to run trials")
    finally:
        first.send_signal(signal.SIGKILL)
        output, _ = first.communicate(timeout=30)
    study = optuna.load_study(study_name=study_name, storage=storage)
    interrupted = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    assert interrupted, output[-2000:]
    again = subprocess.run(command, env=cli_env(), cwd=tmp_path, capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "Best trial" in again.stdout
    trials = exact_trials(study, 8)
    by_number = {t.number: t for t in trials}
    for number in interrupted:
        assert by_number[number].state == TrialState.FAIL
        assert any(t.user_attrs.get(record.RETRY_OF) == number for t in trials)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(str(t.user_attrs[record.WORKER]).startswith("ray-") for t in finished)
    assert "password" not in again.stderr


@pytest.mark.slow
def test_cli_driver_sigterm_stops_the_actors_and_hands_their_trials_back(
        cluster: Any, pg_url: str, study_name: str, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(sleepy_spec(
        study_name, n_trials=6, epochs=8, objective={"function": "objectives:env_probe"})))
    driver = subprocess.Popen(
        [sys.executable, "-m", "search", "launch", str(spec), "--storage", pg_url,
         "--no-progress", "--ray", cluster.address, "--workers", "2"],
        env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    storage = open_storage(pg_url)
    try:
        def training() -> list[int]:
            with contextlib.suppress(KeyError):
                study = optuna.load_study(study_name=study_name, storage=storage)
                return [t.number for t in study.get_trials(states=(TrialState.RUNNING,))
                        if t.intermediate_values]
            return []

        _wait_for(training, "the driver's actors to be training")
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=90)
    finally:
        driver.kill()
    assert driver.returncode == 130, output[-3000:]
    assert "Interrupted: actors stopped, running trials handed back." in output
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    handed = [t for t in trials if t.state == TrialState.FAIL]
    assert handed
    for trial in handed:
        assert trial.user_attrs[record.FAIL_REASON] == record.Outcome.PREEMPTED.value
        assert any(t.user_attrs.get(record.RETRY_OF) == trial.number
                   and t.state == TrialState.WAITING for t in trials)
