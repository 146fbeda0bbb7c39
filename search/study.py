"""Create a study once, load it anywhere: the spec travels with the study in the database.

The resolved spec is stored in the study's user attributes (`spec`), with the budget
(`n_trials`), so a worker on any machine needs only the study name and the storage URL, and a
person reviewing or resuming the study sees how it was defined.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from search import config, optuna_compat, record, space
from search.budget import budget_state, study_lock
from search.exceptions import SpecError, StudyConflictError, StudyNotFoundError
from search.pruning import make_pruner
from search.spec import StudySpec, spec_from_dict
from search.storage import mask_url

logger = logging.getLogger(__name__)

SPEC_ATTR = record.SPEC
#: Spec fields a live study takes from a newer study file (workers started after it use them).
MUTABLE_FIELDS = ("workers", "pruning", "early_stopping")
#: Spec fields never stored on the study (the storage URL may hold a password).
UNSTORED_FIELDS = ("storage",)
#: Every other field (direction, metric, space, objective, epochs, seed, sampler, ...) defines
#: what the study's values mean or which configurations it samples: changing it is refused.


@dataclass(frozen=True)
class SpecChange:
    """One field of a live study changed by a newer study file or `--n-trials`."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class StudyUpdate:
    """What `create_or_update_study` did: created the study, or applied `changes` to it."""

    study: optuna.Study
    created: bool
    changes: tuple[SpecChange, ...] = ()

    def describe(self) -> str:
        """One sentence for the operator: always says what was applied."""
        name, budget = self.study.study_name, self.study.user_attrs.get(record.BUDGET)
        if self.created:
            return f"Created study {name} (budget {budget} trials)."
        if not self.changes:
            return f"Continuing study {name} (budget {budget} trials); no changes applied."
        applied = "; ".join(str(c) for c in self.changes)
        return f"Continuing study {name}; applied: {applied}."


def create_or_load_study(
    spec: StudySpec, storage: optuna.storages.BaseStorage, *, n_trials: int | None = None
) -> optuna.Study:
    """`create_or_update_study(...).study`: create the study or continue the existing one."""
    return create_or_update_study(spec, storage, n_trials=n_trials).study


def create_or_update_study(
    spec: StudySpec, storage: optuna.storages.BaseStorage, *, n_trials: int | None = None
) -> StudyUpdate:
    """Create the study described by `spec`, or apply the changes it may make to the live one.

    A new study gets its spec (without the storage URL), its budget, a uuid
    (`search.record.STUDY_UUID`, which keys its checkpoints) and its first trial, queued
    (`sampler.start`: `search.space.start_params`; none for `start: none`). An existing one
    takes a new budget when the caller asks (`n_trials`, or the spec's `n_trials` differs
    from the stored spec's; never below the finished count) and new `workers`, `pruning`
    and `early_stopping` sections; each applied change is appended to
    `search.record.SPEC_CHANGES` with its time. The check and the writes happen under the
    study lock, so of two concurrent calls with different definitions exactly one wins.

    Raises:
        StudyConflictError: any other field differs from the stored spec (the message names
            each field path with both values), or the budget would drop below the trials
            already finished. Nothing is written then.
    """
    study = optuna.create_study(
        storage=storage,
        study_name=spec.name,
        direction=spec.direction,
        load_if_exists=True,
    )
    new = stored_spec(spec)
    with study_lock(study):
        attrs = study.user_attrs
        stored = attrs.get(record.SPEC)
        if stored is None:
            if not attrs.get(record.STUDY_UUID):  # set once, before the spec that publishes it
                study.set_user_attr(record.STUDY_UUID, uuid.uuid4().hex)
            study.set_user_attr(record.BUDGET, config.n_trials(n_trials, spec.n_trials))
            study.set_user_attr(record.SPEC, new)
            study.set_metric_names([spec.metric])  # the dashboard shows it, not "Objective 0"
            start = space.start_params(spec)
            if start:  # queued under the lock, so no other launcher's worker claims first
                given = "given" if isinstance(spec.sampler.start, dict) else "defaults"
                study.enqueue_trial(start, user_attrs={record.START: given})
            logger.info("Created study %r.", spec.name)
            return StudyUpdate(study, created=True)
        secret = any(stored.get(f) is not None for f in UNSTORED_FIELDS)
        changes, merged = _plan_update(study, _with_defaults(stored), new, attrs, n_trials)
        if changes or secret:
            _apply(study, changes, merged, attrs)
    logger.info("Continuing study %r with %d trials.", spec.name, len(study.trials))
    return StudyUpdate(study, created=False, changes=tuple(changes))


def stored_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as it is stored on the study: every default filled in, no storage URL."""
    resolved = spec.resolved()
    for field_name in UNSTORED_FIELDS:
        resolved.pop(field_name, None)
    return resolved


def _with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """The stored spec with fields added since it was stored filled with their defaults."""
    try:
        return stored_spec(spec_from_dict(stored, source="the stored spec"))
    except SpecError:
        return {k: v for k, v in stored.items() if k not in UNSTORED_FIELDS}


def _plan_update(
    study: optuna.Study,
    stored: dict[str, Any],
    new: dict[str, Any],
    attrs: dict[str, Any],
    n_trials: int | None,
) -> tuple[list[SpecChange], dict[str, Any]]:
    differences = _differences(stored, new)
    refused = [
        d for d in differences if d.field.split(".")[0] not in (*MUTABLE_FIELDS, "n_trials")
    ]
    if refused:
        details = "; ".join(
            f"{d.field}: stored {_show(d.old)}, new {_show(d.new)}" for d in refused
        )
        raise StudyConflictError(
            f"study {study.study_name!r} already exists with a different definition "
            f"({details}); only n_trials, workers.*, pruning and early_stopping may change on a "
            "live study: use a new study name, or launch it with the spec it was created with"
        )
    changes = [d for d in differences if d.field.split(".")[0] in MUTABLE_FIELDS]
    merged = {k: v for k, v in stored.items() if k not in UNSTORED_FIELDS}
    merged.update({f: new[f] for f in MUTABLE_FIELDS if f in new})
    current = attrs.get(record.BUDGET)
    budget = n_trials
    if budget is None and new.get("n_trials") != stored.get("n_trials"):
        budget = new.get("n_trials")
        merged["n_trials"] = budget
    if budget is not None and budget != current:
        finished = budget_state(study).finished
        if budget < finished:
            raise StudyConflictError(
                f"n_trials: cannot set the budget of study {study.study_name!r} to {budget}: "
                f"{finished} trials have already finished (stored budget {current})"
            )
        changes.insert(0, SpecChange("n_trials", current, budget))
    return changes, merged


def _apply(
    study: optuna.Study, changes: list[SpecChange], merged: dict[str, Any], attrs: dict[str, Any]
) -> None:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for change in changes:
        if change.field == "n_trials":
            study.set_user_attr(record.BUDGET, change.new)
        logger.info("Study %r: %s (applied).", study.study_name, change)
    history = list(attrs.get(record.SPEC_CHANGES) or [])
    history += [{"time": now, "field": c.field, "old": c.old, "new": c.new} for c in changes]
    if changes:
        study.set_user_attr(record.SPEC_CHANGES, history)
    study.set_user_attr(record.SPEC, merged)


_ABSENT = object()


def _differences(stored: Any, new: Any, path: str = "") -> list[SpecChange]:
    if isinstance(stored, dict) and isinstance(new, dict):
        found: list[SpecChange] = []
        for key in [*stored, *(k for k in new if k not in stored)]:
            if key in UNSTORED_FIELDS and not path:
                continue
            found += _differences(
                stored.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}" if path else key
            )
        return found
    if stored == new and isinstance(stored, bool) == isinstance(new, bool):
        return []
    return [
        SpecChange(path, None if stored is _ABSENT else stored, None if new is _ABSENT else new)
    ]


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value, sort_keys=False, default=str)


def study_uuid(study: optuna.Study) -> str:
    """The study's uuid (keys its checkpoints); a study created before uuids gets one now."""
    found = study.user_attrs.get(record.STUDY_UUID)
    if found:
        return str(found)
    with study_lock(study):
        found = study.user_attrs.get(record.STUDY_UUID)
        if not found:
            found = uuid.uuid4().hex
            study.set_user_attr(record.STUDY_UUID, found)
    return str(found)


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
    return RecentTPESampler(
        seed=seed,
        n_startup_trials=spec.sampler.n_startup_trials,
        multivariate=spec.sampler.multivariate,
        constant_liar=True,
    )


#: The latest finished trials TPE fits its densities to: a sample costs the same at 5,000
#: trials as at 1,000 (TPE already weighs older trials down; see benchmarks/coordination).
TPE_WINDOW = 1000


class RecentTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE fitted to the `TPE_WINDOW` latest finished trials (and the running ones,
    for the constant liar), so its cost per trial stays bounded as the study grows."""

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        recent: Any = optuna_compat.RecentTrials(study, TPE_WINDOW)
        return super().sample_relative(recent, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        recent: Any = optuna_compat.RecentTrials(study, TPE_WINDOW)
        return super().sample_independent(recent, trial, param_name, param_distribution)


#: The most study names a "no study" error lists (a shared database may hold hundreds).
LISTED_STUDIES = 10


def _not_found(name: str, storage: optuna.storages.BaseStorage) -> str:
    names = sorted(s.study_name for s in storage.get_all_studies())
    url = mask_url(getattr(storage, "url", ""))
    if not names:
        return f"no study {name!r} in {url}; it holds no studies"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        return f"no study {name!r} in {url}; did you mean {' or '.join(map(repr, close))}?"
    shown = ", ".join(names[:LISTED_STUDIES])
    more = f" and {len(names) - LISTED_STUDIES} more" if len(names) > LISTED_STUDIES else ""
    return f"no study {name!r} in {url}; studies there: {shown}{more}"


def trial_seed(base: int, number: int) -> int:
    """The sampler seed of one trial of a seeded study (spec seed, trial number): distinct
    for every trial, whichever worker, restart or launcher samples it."""
    return int.from_bytes(hashlib.sha256(f"{base}:{number}".encode()).digest()[:4], "big")
