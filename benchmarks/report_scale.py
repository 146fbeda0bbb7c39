"""How `search report`, `search status`, `search audit` and `search export` scale with a study.

Builds a synthetic study of N finished trials (20 epochs each, with `epoch_metrics` rows,
a third pruned with a rule, a few failed and retried) in a temporary SQLite file, then times
each read-only command's library call and prints the report size.

    python benchmarks/report_scale.py 50 200
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution, IntDistribution

from search import record
from search.audit import audit
from search.export import to_json
from search.report import build_report
from search.status import open_study_read_only, study_status
from search.storage import open_storage, open_storage_read_only


def synthetic_study(url: str, n: int, epochs: int = 20) -> None:
    rng = random.Random(0)
    study = optuna.create_study(storage=open_storage(url), study_name="scale")
    study.set_user_attr(record.SPEC, {"metric": "val_loss", "epochs": epochs})
    study.set_user_attr(record.BUDGET, n)
    space = {"lr": FloatDistribution(1e-4, 0.3, log=True), "batch_size": IntDistribution(16, 256),
             "depth": IntDistribution(1, 4), "width": IntDistribution(32, 512, log=True)}
    for i in range(n):
        params = {"lr": 10 ** rng.uniform(-4, math.log10(0.3)), "batch_size": rng.randint(16, 256),
                  "depth": rng.randint(1, 4), "width": rng.randint(32, 512)}
        floor = 0.05 + abs(math.log10(params["lr"]) + 2) * 0.1
        pruned = i % 3 == 2
        last = rng.randint(3, epochs // 2) if pruned else epochs
        curve = {e: floor + 2.0 / e for e in range(1, last + 1)}
        rows = [{"epoch": e, "val_loss": v, "train_loss": v * 0.9, "epoch_seconds": 1.5}
                for e, v in curve.items()]
        attrs = {record.EPOCH_METRICS: rows, record.WORKER: f"w{i % 4}"}
        if pruned:
            attrs.update({record.PRUNE_RULE: "comparative", record.PRUNE_REASON: "behind"})
        state = optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(
            state=state, value=None if pruned else min(curve.values()), params=params,
            distributions=space, intermediate_values=curve, user_attrs=attrs))


def main(sizes: list[int]) -> None:
    print("| trials | report s | report MB | status s | audit (median) s | export json s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'scale.db'}"
            synthetic_study(url, n)
            study = open_study_read_only("scale", url)
            timings = []
            start = time.perf_counter()
            page = build_report(study)
            timings.append(time.perf_counter() - start)
            start = time.perf_counter()
            study_status(open_storage_read_only(url), "scale")
            timings.append(time.perf_counter() - start)
            start = time.perf_counter()
            audit(study, ["median"])
            timings.append(time.perf_counter() - start)
            start = time.perf_counter()
            to_json(study)
            timings.append(time.perf_counter() - start)
            print(f"| {n} | {timings[0]:.2f} | {len(page) / 1e6:.1f} | {timings[1]:.2f} | "
                  f"{timings[2]:.2f} | {timings[3]:.2f} |")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [50, 200])
