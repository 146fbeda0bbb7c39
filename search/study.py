"""Create a study once, load it anywhere: the spec travels with the study in the database.

The resolved spec is stored in the study's user attributes (`spec`), with the budget
(`n_trials`), so a worker on any machine needs only the study name and the storage URL, and a
person reviewing or resuming the study sees how it was defined.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import optuna

from search.budget import BUDGET_ATTR
from search.exceptions import StudyConflictError, StudyNotFoundError
from search.pruning import make_pruner
from search.spec import StudySpec, spec_from_dict
from search.storage import mask_url

logger = logging.getLogger(__name__)

SPEC_ATTR = "spec"
#: Fields that define what the study's values mean; changing them on a live study mixes results.
IDENTITY_FIELDS = (
    "direction",
    "metric",
    "space",
    "lr_scaling",
    "max_batch_size",
    "objective",
    "epochs",
)


def create_or_load_study(
    spec: StudySpec, storage: optuna.storages.BaseStorage, *, n_trials: int | None = None
) -> optuna.Study:
    """Create the study described by `spec`, or continue the existing one of the same name.

    Raises:
        StudyConflictError: a study of that name exists and was defined with a different
            direction, metric, search space or objective.
    """
    study = optuna.create_study(
        storage=storage,
        study_name=spec.name,
        direction=spec.direction,
        load_if_exists=True,
    )
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, spec.resolved())
        study.set_metric_names([spec.metric])  # optuna-dashboard shows it, not "Objective 0"
        logger.info("Created study %r.", spec.name)
    else:
        check_compatible(stored, spec)
        logger.info("Continuing study %r with %d trials.", spec.name, len(study.trials))
    budget = n_trials if n_trials is not None else spec.n_trials
    if study.user_attrs.get(BUDGET_ATTR) != budget:
        study.set_user_attr(BUDGET_ATTR, budget)
    return study


def check_compatible(stored: dict[str, Any], spec: StudySpec) -> None:
    """Refuse a spec whose identity fields differ from the one stored on the study."""
    new = spec.resolved()
    changed = [field for field in IDENTITY_FIELDS if stored.get(field) != new.get(field)]
    if changed:
        details = ", ".join(
            f"{f}: stored {stored.get(f)!r:.60} vs new {new.get(f)!r:.60}" for f in changed
        )
        raise StudyConflictError(
            f"study {spec.name!r} already exists with a different definition ({details}); "
            "use a new study name, or launch it with the spec it was created with"
        )


def load_study(
    name: str,
    storage: optuna.storages.BaseStorage,
    *,
    seed: int | Callable[[int | None], int | None] | None = None,
) -> tuple[optuna.Study, StudySpec]:
    """Load an existing study with the sampler and pruner its stored spec asks for.

    Args:
        seed: the sampler seed for this process, or a function of the spec's seed (a worker
            derives its own); `None` uses the spec's seed as it is.

    Raises:
        StudyNotFoundError: no study of that name, or it was not created by `search`.
    """
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as e:
        raise StudyNotFoundError(_not_found(name, storage)) from e
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise StudyNotFoundError(
            f"study {name!r} has no stored spec: it was not created by `search launch`"
        )
    spec = spec_from_dict(stored, source=f"study {name!r}")
    if callable(seed):
        seed = seed(spec.seed)
    study.sampler = make_sampler(spec, seed=spec.seed if seed is None else seed)
    study.pruner = make_pruner(spec.pruning.pruner, spec.pruning.options())
    return study, spec


def make_sampler(spec: StudySpec, *, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler the spec asks for. TPE uses the constant liar so parallel workers spread."""
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=spec.sampler.n_startup_trials,
        multivariate=spec.sampler.multivariate,
        constant_liar=True,
    )


def worker_seed(base: int | None, worker_id: str) -> int | None:
    """A per-worker seed derived from the spec seed, so seeded workers never repeat each other."""
    if base is None:
        return None
    digest = hashlib.sha256(f"{base}:{worker_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _not_found(name: str, storage: optuna.storages.BaseStorage) -> str:
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    url = getattr(storage, "url", "")
    known = f"; studies there: {', '.join(names)}" if names else "; it holds no studies"
    return f"no study {name!r} in {mask_url(url)}{known}"
