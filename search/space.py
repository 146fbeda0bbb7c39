"""The search space: turn a spec's `space` into Optuna suggestions and trainer params.

Every sampled value is an Optuna param (so optuna-dashboard shows it). Derived values, such as
the effective learning rate under batch-size scaling, are returned separately and recorded as
user attributes by the worker.
"""

from __future__ import annotations

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
        params[name] = _suggest_one(trial, name, param, spec.max_batch_size)
    return params


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
    trial: optuna.trial.BaseTrial, name: str, param: ParamSpec, max_batch: int | None
) -> Any:
    kind = param.kind
    if kind == "categorical":
        assert param.choices is not None
        choices = param.choices
        if name == "batch_size" and max_batch is not None:
            choices = [c for c in choices if not isinstance(c, int | float) or c <= max_batch]
        return trial.suggest_categorical(name, choices)
    assert param.low is not None and param.high is not None
    if kind == "pow2":
        cap = max_batch if name == "batch_size" else None
        return trial.suggest_categorical(name, param.pow2_choices(cap))
    if kind == "int":
        high = int(param.high)
        if name == "batch_size" and max_batch is not None:
            high = min(high, max_batch)
        step = int(param.step) if param.step else 1
        return trial.suggest_int(name, int(param.low), high, step=step, log=param.log)
    return trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)
