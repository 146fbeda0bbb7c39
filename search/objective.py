"""The training function a study runs: the built-in trainer or the user's, and its result.

The contract is `train(params, device, report, [checkpoint=..., epochs=...,
accumulation_steps=...])`; `report` is a `search.reporter.Reporter`. What the function returns
is only used when it reported no finite value of the metric: a number, or a 0-d tensor.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

from search.spec import StudySpec, import_objective


def build_training_function(spec: StudySpec) -> Callable[..., Any]:
    """The callable to run for each trial: the built-in trainer or the spec's function."""
    if spec.objective.function is None:
        from search import trainable

        return functools.partial(
            trainable.train,
            dataset=spec.objective.dataset,
            epochs=spec.epochs,
            seed=spec.seed or 0,
        )
    function = import_objective(spec.objective.function)
    accepted = inspect.signature(function).parameters
    if "epochs" in accepted:
        function = functools.partial(function, epochs=spec.epochs)
    return function


def call_training(
    function: Callable[..., Any],
    params: dict[str, Any],
    device: str,
    report: Callable[[int, dict[str, Any]], None],
    **extras: Any,
) -> Any:
    """Call `function`, passing only the optional keywords (`checkpoint`, ...) it accepts."""
    target = function.func if isinstance(function, functools.partial) else function
    accepted = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in extras.items() if v is not None and (takes_any or k in accepted)}
    return function(params, device, report, **kwargs)


def returned_value(returned: Any) -> float | None:
    """The finite number a training function returned, if any (`return loss` of a 0-d
    tensor or a numpy scalar counts); None for None, NaN, inf or anything else."""
    item = getattr(returned, "item", None)
    if callable(item) and getattr(returned, "ndim", 0) == 0:
        returned = item()
    if isinstance(returned, bool) or not isinstance(returned, int | float):
        return None
    return float(returned) if math.isfinite(returned) else None


def describe_returned(returned: Any) -> str:
    """A short description of an unusable return value, for the trial's fail reason."""
    shape = getattr(returned, "shape", None)
    kind = type(returned).__name__
    return f"{kind} of shape {tuple(shape)}" if shape is not None else f"{kind} {returned!r:.40}"
