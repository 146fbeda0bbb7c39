"""The search space: turn a spec's `space` into Optuna suggestions and trainer params.

Every sampled value is an Optuna param (so optuna-dashboard shows it). Derived values, such as
the effective learning rate under batch-size scaling, are returned separately and recorded as
user attributes by the worker.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from search.spec import LrScalingSpec, ParamSpec, StudySpec

if TYPE_CHECKING:
    import optuna


def suggest(trial: optuna.trial.BaseTrial, spec: StudySpec) -> dict[str, Any]:
    """Sample every active parameter of `spec.space` on `trial`, in spec order.

    A parameter whose `when` condition does not hold is left out (conditional parameters).
    """
    params: dict[str, Any] = {}
    for name, param in spec.space.items():
        if not _active(param, params):
            continue
        params[name] = _suggest_one(trial, name, param, spec.cap_of(name))
    return params


#: The built-in trainer's first trial, where the space allows (`start_params`): Adam at the
#: learning rate of its paper (Kingma & Ba 2015), SGD with momentum 0.9 at 0.01, a small
#: batch (32, or `lr_scaling`'s reference, at which `lr` is the base LR), cosine annealing.
RECIPE: dict[str, Any] = {"optimizer": "adam", "momentum": 0.9, "schedule": "cosine"}
ADAPTIVE_LR, SGD_LR, SMALL_BATCH = 1e-3, 1e-2, 32


def start_params(spec: StudySpec) -> dict[str, Any]:
    """The parameters of the study's first trial (`sampler.start`), empty for `none`.

    `defaults`: for the built-in trainer the `RECIPE` value of each parameter its range or
    choices hold; every other parameter (and every one of a user objective) takes the middle
    of its range (the geometric middle on a log scale, the middle power of two for `pow2`)
    or its first choice. Explicit values replace those of the parameters they name. A
    conditional parameter is left out when its `when` does not hold for the values before it.
    """
    start = spec.sampler.start
    if start == "none":
        return {}
    given = start if isinstance(start, dict) else {}
    params: dict[str, Any] = {}
    for name, param in spec.space.items():
        if not _active(param, params):
            continue
        cap = spec.cap_of(name)
        wanted = given.get(name)
        if wanted is None and spec.objective.function is None:
            wanted = _recipe(name, spec)
        if wanted is None or not param.holds(wanted, cap):
            wanted = _middle(param, cap)
        params[name] = wanted
    return params


def _recipe(name: str, spec: StudySpec) -> Any:
    if name == "lr":
        return SGD_LR if _start_optimizer(spec) == "sgd" else ADAPTIVE_LR
    if name == "batch_size":
        return spec.lr_scaling.reference_batch_size if spec.lr_scaling else SMALL_BATCH
    return RECIPE.get(name)


def _start_optimizer(spec: StudySpec) -> Any:
    """The start's optimizer, wherever the space lists it (the trainer's default, Adam, if not)."""
    param, given = spec.space.get("optimizer"), spec.sampler.start
    if param is None:
        return RECIPE["optimizer"]
    if isinstance(given, dict) and "optimizer" in given:
        return given["optimizer"]
    return RECIPE["optimizer"] if param.holds(RECIPE["optimizer"]) else _middle(param, None)


def _middle(param: ParamSpec, cap: int | None) -> Any:
    if param.kind in ("categorical", "pow2"):
        options = param.options(cap)
        return options[0] if param.kind == "categorical" else options[(len(options) - 1) // 2]
    low, high = param.bounds(cap)
    middle = math.sqrt(low * high) if param.log else (low + high) / 2
    if param.step:
        middle = low + round((middle - low) / param.step) * param.step
    return min(max(round(middle), int(low)), int(high)) if param.kind == "int" else middle


def trainer_params(
    params: dict[str, Any], spec: StudySpec
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split sampled params into what the trainer gets and what is derived for the record.

    Returns:
        `(train_params, derived)`: `train_params["lr"]` is the effective learning rate; `derived`
        holds `effective_lr` (and `base_lr`) when `lr_scaling` is set, otherwise it is empty.
    """
    if spec.lr_scaling is None or "lr" not in params or "batch_size" not in params:
        return dict(params), {}
    effective = scaled_lr(params["lr"], params["batch_size"], spec.lr_scaling)
    return {**params, "lr": effective}, {"base_lr": params["lr"], "effective_lr": effective}


def scaled_lr(base_lr: float, batch_size: int, scaling: LrScalingSpec) -> float:
    """The LR for `batch_size` when `base_lr` was right at the reference batch size.

    With k = batch_size / reference, the LR grows by √k (`sqrt`, suited to adaptive optimizers)
    or by k (`linear`, the Goyal et al. rule for SGD).
    """
    k = batch_size / scaling.reference_batch_size
    return base_lr * (k**0.5 if scaling.rule == "sqrt" else k)


def _active(param: ParamSpec, sampled: dict[str, Any]) -> bool:
    for parent, wanted in (param.when or {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if sampled.get(parent) not in allowed:
            return False
    return True


def _suggest_one(
    trial: optuna.trial.BaseTrial, name: str, param: ParamSpec, cap: int | None
) -> Any:
    if param.kind in ("categorical", "pow2"):
        return trial.suggest_categorical(name, param.options(cap))
    low, high = param.bounds(cap)
    if param.kind == "int":
        step = int(param.step) if param.step else 1
        return trial.suggest_int(name, int(low), int(high), step=step, log=param.log)
    return trial.suggest_float(name, low, high, step=param.step, log=param.log)
