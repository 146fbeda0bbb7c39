"""Node loss on a real local Ray cluster: how a study fares when nodes die mid-trial.

    python benchmarks/ray_node_loss.py --nodes 3 --gpus 2 --kills 2 --n-trials 30

Starts `ray.cluster_utils.Cluster` (real raylets and actor processes on this machine, each node
declaring fake GPUs), runs `search.ray_engine.RayFleet` on a sleepy study in the PostgreSQL of
SEARCH_TEST_POSTGRES_URL, kills a non-head node (`kill -9` of its raylet) each time it holds a
trial under way, and prints the outcome: finished trials against the budget, what was left
RUNNING, the trials lost with their node and how long until their retry started.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=2, help="fake GPUs per node")
    parser.add_argument("--kills", type=int, default=2, help="nodes to kill (< nodes)")
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--epoch-seconds", type=float, default=0.5)
    args = parser.parse_args()
    if not 0 <= args.kills < args.nodes:
        parser.error(f"--kills must be in [0, --nodes), but got {args.kills=}")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    os.environ["SEARCH_TEST_EPOCH_SECONDS"] = str(args.epoch_seconds)

    import ray
    import yaml
    from conftest import sleepy_spec
    from optuna.trial import TrialState
    from ray.cluster_utils import Cluster

    from search import record
    from search.ray_engine import RayFleet
    from search.spec import load_spec
    from search.storage import open_storage
    from search.study import create_or_load_study

    url = os.environ.get("SEARCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    node = {"num_cpus": 1, "num_gpus": args.gpus, "object_store_memory": 80 * 1024 * 1024}
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "redis_port": _free_port(), "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 1000},
    })
    for _ in range(args.nodes - 1):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    name = f"bench-ray-loss-{uuid.uuid4().hex[:8]}"
    spec_path = Path(f"/tmp/{name}.yaml")
    spec_path.write_text(yaml.safe_dump(sleepy_spec(
        name, n_trials=args.n_trials, epochs=args.epochs,
        objective={"function": "objectives:env_probe"})))
    study = create_or_load_study(load_spec(spec_path), open_storage(url))
    fleet = RayFleet(study, url)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(fleet.run(poll=0.5)), daemon=True)
    thread.start()
    head = ray.get_runtime_context().get_node_id()
    kills: list[tuple[str, float, list[int]]] = []
    for victim in [n for n in cluster.list_all_nodes() if n.node_id != head][: args.kills]:
        prefix = f"ray-{victim.node_id[:8]}-"
        while thread.is_alive():
            running = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))
                       if t.intermediate_values
                       and str(t.user_attrs.get(record.WORKER, "")).startswith(prefix)]
            if running:
                break
            time.sleep(0.2)
        else:
            break
        cluster.remove_node(victim, allow_graceful=False)
        kills.append((victim.node_id[:8], time.time(), running))
    thread.join()
    wall = time.monotonic() - started
    trials = study.get_trials()
    states = Counter(t.state.name for t in trials)
    print(f"cluster: {args.nodes} nodes x {args.gpus} fake GPUs = {args.nodes * args.gpus} "
          f"actors; study {name}: {args.n_trials} trials of {args.epochs} x "
          f"{args.epoch_seconds} s")
    print(f"finished {states['COMPLETE'] + states['PRUNED']} of {args.n_trials}; "
          f"RUNNING {states['RUNNING']}, WAITING {states['WAITING']}, FAIL {states['FAIL']}; "
          f"actors started {len(fleet.actors)}; wall {wall:.1f} s (cluster start included)")
    killed_at = {node_id: at for node_id, at, _ in kills}
    for node_id, _, seen in kills:
        print(f"node {node_id} killed while trial(s) {seen} were under way on it")
    for failed in (t for t in trials if t.state == TrialState.FAIL):
        worker = str(failed.user_attrs.get(record.WORKER, "?"))
        node_id = worker.split("-")[1] if worker.startswith("ray-") else "?"
        retry = next((t for t in trials if t.user_attrs.get(record.RETRY_OF) == failed.number),
                     None)
        delay = (retry.datetime_start.timestamp() - killed_at[node_id]
                 if retry is not None and retry.datetime_start and node_id in killed_at
                 else float("nan"))
        print(f"trial {failed.number} on {worker} -> FAIL "
              f"({failed.user_attrs.get(record.FAIL_REASON)}); retry "
              f"{retry.number if retry else None} {retry.state.name if retry else '-'} on "
              f"{retry.user_attrs.get(record.WORKER) if retry else '-'}, started "
              f"{delay:.1f} s after its node was killed")
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
