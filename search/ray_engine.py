"""Ray: keep one worker actor per cluster GPU alive, each running the `search worker` loop.

`search launch SPEC --ray ADDRESS` connects to a Ray cluster and, every `poll` seconds,
compares the actors it wants with the nodes that are alive (`plan_actors`): `workers_per_gpu`
actors per GPU of each node, each pinned to its node with `num_gpus=1/K` so that Ray sets its
`CUDA_VISIBLE_DEVICES`, or CPU actors (`num_cpus=2`) when the cluster has no GPU at all. A node
that joins gets actors at the next reconcile. Each actor builds a `search.worker.Worker` against
the study's database and runs its loop until the budget is met.

Nothing about the study lives in Ray. An actor whose process dies is restarted in place by Ray
(`max_restarts`) and its trial, left RUNNING with a heartbeat that goes stale, is failed and
retried by any worker's reaper (a trial past `workers.epoch_timeout` ends its process the
same way, through the worker's watchdog); a node that dies takes its actors with it, and the
same reaping recovers their trials on the other nodes. Killing the driver kills its actors the
same way, and starting it again continues the study from the database.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from search import optuna_compat, record
from search.budget import BudgetState, budget_state
from search.exceptions import SearchError
from search.launcher import noting_signals
from search.record import Outcome
from search.retry import fail_and_requeue

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3  # Ray restarts a crashed actor (and reruns its loop) this many times
CPUS_PER_CPU_WORKER = 2  # as `search launch` on a machine without GPUs: half the cores each
INSTALL_HINT = "pip install 'gridfleet-search[ray]'"


class RayError(SearchError):
    """Ray is not installed, or its cluster cannot be reached."""


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node and what it offers."""

    node_id: str
    gpus: float
    cpus: float


@dataclass(frozen=True)
class ActorSlot:
    """One worker actor the driver wants: its node, index there and resource request."""

    node_id: str
    index: int
    num_gpus: float
    num_cpus: float

    @property
    def worker_id(self) -> str:
        return f"ray-{self.node_id[:8]}-{self.index}"


@dataclass(frozen=True)
class ActorInfo:
    """What an actor saw where Ray placed it (for logs and tests)."""

    worker_id: str
    node_id: str
    cuda_visible_devices: str | None
    pid: int
    host: str


@dataclass(frozen=True)
class ActorRun:
    """What an actor's worker loop did, returned when the study is done."""

    worker_id: str
    pid: int  # a new process if Ray restarted the actor
    finished: int
    failed: int
    recycle: bool = False  # it asks for a fresh process (after out-of-memory)


def plan_actors(
    nodes: Sequence[NodeInfo], *, workers_per_gpu: int = 1, max_workers: int | None = None
) -> list[ActorSlot]:
    """The actors to keep alive on these nodes: `workers_per_gpu` per GPU, else CPU actors.

    GPU actors ask for `1/workers_per_gpu` GPU and no CPU (the node's CPUs do not gate its
    GPUs). Only when no node has a GPU, each node gets one actor per `CPUS_PER_CPU_WORKER`
    cores (at least one). `max_workers` caps the total, filling nodes in node-id order.
    """
    if workers_per_gpu < 1:
        raise ValueError(f"workers_per_gpu must be >= 1, but got {workers_per_gpu=}")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, but got {max_workers=}")
    ordered = sorted(nodes, key=lambda n: n.node_id)
    slots: list[ActorSlot] = []
    if any(n.gpus >= 1 for n in ordered):
        for node in ordered:
            count = int(node.gpus) * workers_per_gpu
            slots += [ActorSlot(node.node_id, i, 1 / workers_per_gpu, 0) for i in range(count)]
    else:
        for node in ordered:
            count = max(1, int(node.cpus) // CPUS_PER_CPU_WORKER)
            cpus = min(float(CPUS_PER_CPU_WORKER), node.cpus)
            slots += [ActorSlot(node.node_id, i, 0, cpus) for i in range(count)]
    return slots if max_workers is None else slots[:max_workers]


class WorkerActor:
    """The Ray actor: one `search.worker.Worker` on the device Ray gave this process."""

    def __init__(
        self,
        study_name: str,
        storage_url: str,
        worker_id: str,
        *,
        gpu: bool,
        checkpoint_dir: str | None,
    ) -> None:
        self._args = (study_name, storage_url)
        self._worker_id = worker_id
        self._device = "cuda:0" if gpu else "cpu"  # Ray's CUDA_VISIBLE_DEVICES: one GPU
        self._checkpoint_dir = checkpoint_dir
        self._stop = threading.Event()
        if not gpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        _configure_actor_logging()

    def describe(self) -> ActorInfo:
        import ray

        return ActorInfo(
            worker_id=self._worker_id,
            node_id=ray.get_runtime_context().get_node_id(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            pid=os.getpid(),
            host=socket.gethostname(),
        )

    def run(self) -> ActorRun:
        """Run the worker loop until the study is done or `stop` is called."""
        from search.worker import Worker

        worker = Worker(
            *self._args,
            device=self._device,
            worker_id=self._worker_id,
            checkpoint_dir=self._checkpoint_dir,
            stop_event=self._stop,
            recycle=True,  # after out-of-memory, return so the driver starts a fresh actor
        )
        result = worker.run()
        return ActorRun(
            self._worker_id, os.getpid(), result.finished, result.failed, result.recycle
        )

    def stop(self) -> None:
        """Finish the current epoch, hand the trial back and return from `run`."""
        self._stop.set()


@dataclass
class _Running:
    slot: ActorSlot
    actor: Any
    run_ref: Any
    info_ref: Any
    info: ActorInfo | None = None


@dataclass
class RayFleet:
    """Keep the planned worker actors of one study alive on a Ray cluster until it is done."""

    study: optuna.Study
    storage_url: str
    workers_per_gpu: int = 1
    max_workers: int | None = None
    checkpoint_dir: str | None = None
    actors: dict[str, ActorInfo] = field(default_factory=dict)  # every actor ever started
    runs: dict[str, ActorRun] = field(default_factory=dict)  # every loop that returned
    failures: dict[ActorSlot, int] = field(default_factory=dict)
    _running: dict[ActorSlot, _Running] = field(default_factory=dict)

    def run(
        self, on_progress: Callable[[BudgetState], None] | None = None, poll: float = 1.0
    ) -> BudgetState:
        """Reconcile actors with the cluster until the study is done and every actor returned.

        Raises:
            KeyboardInterrupt: after SIGINT or SIGTERM, once every actor was asked to stop and
                the trials still running were handed back.
        """
        signals: list[int] = []
        with noting_signals(signals):
            while not signals:
                state = budget_state(self.study)
                if on_progress is not None:
                    on_progress(state)
                wanted = self._wanted()  # also forgets the actors of nodes that left
                if not state.done:
                    self._reconcile(wanted)
                if not self._running and (state.done or not wanted):
                    break
                self._collect(poll)
            if signals:
                self.stop()
                raise KeyboardInterrupt
        return budget_state(self.study)

    def stop(self, timeout: float = 60.0) -> None:
        """Ask every actor to stop at its next epoch; kill what is left and hand back trials."""
        import ray

        for running in self._running.values():
            with contextlib.suppress(Exception):
                running.actor.stop.remote()
        refs = [r.run_ref for r in self._running.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for running in self._running.values():
            ray.kill(running.actor, no_restart=True)
        hand_back_trials(self.study, {s.worker_id for s in self._running})
        self._running.clear()

    def _wanted(self) -> list[ActorSlot]:
        nodes = alive_nodes()
        self._forget_dead_nodes({n.node_id for n in nodes})
        plan = plan_actors(
            nodes, workers_per_gpu=self.workers_per_gpu, max_workers=self.max_workers
        )
        # A slot whose loop returned is started again only if the study is not done after all
        # (its budget was raised); one whose worker raised stays down (failures > MAX_RESTARTS).
        return [s for s in plan if self.failures.get(s, 0) <= MAX_RESTARTS]

    def _forget_dead_nodes(self, alive: set[str]) -> None:
        """Actors of a node that left are gone; the reapers retry the trials they held."""
        import ray

        for slot in [s for s in self._running if s.node_id not in alive]:
            running = self._running.pop(slot)
            logger.warning(
                "Node %s left; its worker actor %s is gone.", slot.node_id[:8], slot.worker_id
            )
            with contextlib.suppress(Exception):
                ray.kill(running.actor, no_restart=True)

    def _reconcile(self, wanted: list[ActorSlot]) -> None:
        for slot in wanted:
            if slot in self._running:
                continue
            if self.max_workers is not None and len(self._running) >= self.max_workers:
                break
            self._start(slot)

    def _start(self, slot: ActorSlot) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor_class = _remote_actor_class().options(
            num_gpus=slot.num_gpus,
            num_cpus=slot.num_cpus,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_RESTARTS,
            max_concurrency=2,  # `stop` and `describe` run while `run` loops
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False),
        )
        actor = actor_class.remote(
            self.study.study_name,
            self.storage_url,
            slot.worker_id,
            gpu=slot.num_gpus > 0,
            checkpoint_dir=self.checkpoint_dir,
        )
        self._running[slot] = _Running(slot, actor, actor.run.remote(), actor.describe.remote())
        logger.info(
            "Started worker actor %s on node %s (%s).",
            slot.worker_id,
            slot.node_id[:8],
            f"{slot.num_gpus:g} GPU" if slot.num_gpus else f"{slot.num_cpus:g} CPU",
        )

    def _collect(self, timeout: float) -> None:
        """Wait up to `timeout` for an actor to return or die, and record what happened."""
        import ray

        if not self._running:
            time.sleep(timeout)
            return
        by_ref = {r.run_ref: r for r in self._running.values()}
        by_ref.update({r.info_ref: r for r in self._running.values() if r.info is None})
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        for ref in ready:
            running = by_ref[ref]
            if ref is running.info_ref:
                with contextlib.suppress(ray.exceptions.RayError):
                    running.info = ray.get(ref)
                    self.actors[running.slot.worker_id] = running.info
                continue
            self._running.pop(running.slot)
            try:
                done: ActorRun = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the worker raised: restarting won't help
                self.failures[running.slot] = MAX_RESTARTS + 1
                logger.error("Worker actor %s failed: %s", running.slot.worker_id, e.cause)
                continue
            except ray.exceptions.RayError as e:  # its process or node died: start it again
                self.failures[running.slot] = self.failures.get(running.slot, 0) + 1
                logger.warning("Worker actor %s died: %s", running.slot.worker_id, _first_line(e))
                with contextlib.suppress(Exception):
                    ray.kill(running.actor, no_restart=True)
                continue
            self.runs[done.worker_id] = done
            ray.kill(running.actor, no_restart=True)  # free its GPU now, not when collected
            if done.recycle:  # not a crash: the next reconcile starts a fresh actor
                logger.info("Worker actor %s recycled; starting a fresh one.", done.worker_id)
                continue
            logger.info(
                "Worker actor %s done: %d finished, %d failed.",
                done.worker_id,
                done.finished,
                done.failed,
            )


@functools.cache
def _remote_actor_class() -> Any:
    import ray

    return ray.remote(WorkerActor)


def launch(
    study: optuna.Study,
    storage_url: str,
    *,
    workers_per_gpu: int = 1,
    max_workers: int | None = None,
    checkpoint_dir: str | None = None,
    on_progress: Callable[[BudgetState], None] | None = None,
) -> BudgetState:
    """Run the study's workers on the connected Ray cluster until it is done (`search launch`).

    Raises:
        KeyboardInterrupt: after SIGINT or SIGTERM, once the actors stopped (trials handed back).
    """
    nodes = alive_nodes()
    plan = plan_actors(nodes, workers_per_gpu=workers_per_gpu, max_workers=max_workers)
    logger.info(
        "Ray cluster: %d node(s), %g GPU(s); keeping %d worker actor(s) for study %r.",
        len(nodes),
        sum(n.gpus for n in nodes),
        len(plan),
        study.study_name,
    )
    fleet = RayFleet(
        study,
        storage_url,
        workers_per_gpu=workers_per_gpu,
        max_workers=max_workers,
        checkpoint_dir=checkpoint_dir,
    )
    return fleet.run(on_progress=on_progress)


def alive_nodes() -> list[NodeInfo]:
    """The Ray cluster's alive nodes with their GPU and CPU totals."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return [
        NodeInfo(
            n["NodeID"], float(n["Resources"].get("GPU", 0)), float(n["Resources"].get("CPU", 0))
        )
        for n in nodes
    ]


def connect(address: str) -> None:
    """Connect to the Ray cluster at `address` (`auto`, `HOST:PORT`, `ray://...`) or `local`."""
    try:
        import ray
    except ImportError as e:
        raise RayError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from e
    if ray.is_initialized():
        return
    _check_reachable(address)
    try:
        if address == "local":
            ray.init(include_dashboard=False, configure_logging=False)
        else:
            ray.init(address=address, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayError(
            f"cannot connect to the Ray cluster at {address!r} ({_first_line(e)}); start one "
            "with `ray start --head`, pass its address, or use `--ray local`"
        ) from e


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (`ray.init` would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if address in ("auto", "local") or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise RayError(
            f"cannot connect to the Ray cluster at {address!r} ({e}); is its head node "
            "running (`ray start --head`)? Or use `--ray auto` on a node of the cluster"
        ) from e


def hand_back_trials(study: optuna.Study, worker_ids: set[str]) -> int:
    """Fail and requeue the RUNNING trials of these workers (killed on stop); returns count."""
    storage = optuna_compat.storage_of(study)
    handed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(record.WORKER) in worker_ids:
            handed += fail_and_requeue(
                storage,
                optuna_compat.study_id(study),
                optuna_compat.trial_id(trial),
                Outcome.INTERRUPTED,
                max_retries=None,
            )
    return handed


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _configure_actor_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.WARNING)
