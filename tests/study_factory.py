"""A real finished study to review: trained by a real worker, with prunes, a lost trial and
its retry, so reports, exports, audits and the dashboard have every kind of record to show."""

from __future__ import annotations

import time
from typing import Any

import optuna

from search import optuna_compat, record
from search.retry import fail_and_requeue
from search.space import suggest
from search.spec import spec_from_dict
from search.storage import open_storage
from search.study import create_or_load_study
from search.worker import Worker


def bumpy(params: dict[str, Any], device: str, report: Any, epochs: int = 6) -> None:
    """The loss falls towards (x - 0.3)^2; for x > 0.6 it goes NaN at epoch 2 (pruned)."""
    x = float(params["x"])
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        time.sleep(0.005)
        loss = (x - 0.3) ** 2 + 1.0 / epoch
        if x > 0.6 and epoch >= 2:
            loss = float("nan")
        seconds = time.perf_counter() - start
        metrics = {"val_loss": loss, "val_accuracy": 1.0 - min(1.0, loss)}
        report(epoch, {**metrics, "epoch_seconds": seconds})


def review_spec(name: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "n_trials": 10,
        "epochs": 6,
        "seed": 3,
        "sampler": {"type": "random"},
        "space": {
            "x": {"type": "float", "low": -1.0, "high": 1.0},
            "lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "batch_size": {"choices": [16, 32, 64]},
            "depth": {"low": 1, "high": 3},
            "width": {"low": 8, "high": 64, "log": True},
        },
        "objective": {"function": "study_factory:bumpy"},
        "workers": {"heartbeat_interval": 1, "grace_period": 4},
    }
    spec.update(overrides)
    return spec


def make_finished_study(url: str, name: str) -> optuna.Study:
    """Run `review_spec(name)` to its budget with one in-process worker; trial 0 is lost (as
    if its worker died: failed `heartbeat-stale`) and retried with its parameters."""
    spec = spec_from_dict(review_spec(name), source="test")
    study = create_or_load_study(spec, open_storage(url))
    study.sampler = optuna.samplers.RandomSampler(seed=3)  # the lost trial's params are fixed
    lost = study.ask()
    suggest(lost, spec)
    lost.set_user_attr(record.WORKER, "dead-worker")
    fail_and_requeue(
        optuna_compat.storage_of(study),
        optuna_compat.study_id(study),
        optuna_compat.trial_id(lost),
        record.Outcome.HEARTBEAT_LOST,
        max_retries=1,
    )
    Worker(name, url, worker_id="review-w0").run()
    return optuna.load_study(study_name=name, storage=open_storage(url))


def broken(params: dict[str, Any], device: str, report: Any, epochs: int = 2) -> None:
    """Always raises: a bug in the objective, so the study's trials fail beyond any bound."""
    raise RuntimeError(f"broken objective (x={params['x']:.3f})")
