"""One plain-Optuna worker, the usual recipe: load the study, `study.optimize` until a count.

    python plain_worker.py STORAGE_URL STUDY_NAME MAX_TRIALS [EPOCHS]

`STORAGE_URL` may be `journal:PATH` for Optuna's JournalStorage on a file (JournalFileBackend).

TPE (Optuna's defaults) + `MedianPruner(n_startup_trials=5, n_warmup_steps=5)`, a report and
a `should_prune` every epoch, `MaxTrialsCallback(MAX_TRIALS)` counting COMPLETE + PRUNED. The
objective is the same `coord_sleepy.sleepy` the `search` workers run.
"""

from __future__ import annotations

import sys

import optuna
from coord_sleepy import sleepy
from optuna.trial import TrialState


def open_plain_storage(url: str) -> str | optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        backend = optuna.storages.journal.JournalFileBackend(url.removeprefix("journal:"))
        return optuna.storages.JournalStorage(backend)
    return url


def main() -> None:
    storage, name, max_trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=name,
        storage=open_plain_storage(storage),
        sampler=optuna.samplers.TPESampler(),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5),
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)

        def report(step: int, metrics: dict[str, float]) -> None:
            trial.report(metrics["val_loss"], step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        return sleepy({"x": x}, "cpu", report, epochs=epochs)

    callback = optuna.study.MaxTrialsCallback(
        max_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)
    )
    study.optimize(objective, callbacks=[callback])


if __name__ == "__main__":
    main()
