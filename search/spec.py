"""Study files: load a YAML spec, validate it, and explain every mistake in one line.

A spec is the whole definition of a study (see README "Study file format"). It is validated
once on load; an error names the file, the field path and what is allowed, e.g.::

    studies/x.yaml: space.lr: low (0.1) must be < high (0.001)
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from search.exceptions import ObjectiveError, SpecError

DATASETS = ("digits", "wine", "breast_cancer")
FIRST_CLASS_PARAMS = ("lr", "batch_size", "depth", "width")
Scalar = str | int | float | bool


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Model):
    """One dimension of the search space.

    `type` is inferred when omitted: `choices` makes it categorical, integer bounds make it
    `int`, anything else `float`. `pow2` samples powers of two between `low` and `high`.
    `when` makes the parameter conditional on categorical parameters sampled before it.
    """

    type: Literal["float", "int", "categorical", "pow2"] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Scalar] | None = None
    when: dict[str, Scalar | list[Scalar]] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        kind = self.kind
        if kind == "categorical":
            if not self.choices:
                raise ValueError("choices must be a non-empty list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes choices, not low/high")
            return self
        if self.choices is not None:
            raise ValueError(f"type {kind!r} takes low/high, not choices")
        if self.low is None or self.high is None:
            raise ValueError("a parameter needs both low and high, or a list of choices")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be < high ({self.high:g})")
        if (self.log or kind == "pow2") and self.low <= 0:
            raise ValueError(f"a log-scale parameter needs low > 0, but got low={self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if kind in ("int", "pow2") and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"type {kind!r} needs whole-number bounds")
        if kind == "pow2" and not self.pow2_choices():
            raise ValueError(f"no power of two lies in [{self.low:g}, {self.high:g}]")
        return self

    @property
    def kind(self) -> str:
        if self.type is not None:
            return self.type
        if self.choices is not None:
            return "categorical"
        if _is_whole(self.low) and _is_whole(self.high) and self.step in (None, 1):
            return "int"
        return "float"

    def options(self, cap: int | None = None) -> list[Scalar]:
        """The values of a categorical or pow2 parameter, no number above `cap`."""
        if self.kind == "pow2":
            return list(self.pow2_choices(cap))
        assert self.choices is not None
        return [c for c in self.choices if cap is None or isinstance(c, str | bool) or c <= cap]

    def bounds(self, cap: int | None = None) -> tuple[float, float]:
        """`(low, high)` of a float or int parameter, `high` no more than `cap`."""
        assert self.low is not None and self.high is not None
        return self.low, self.high if cap is None else min(self.high, cap)

    def holds(self, value: Any, cap: int | None = None) -> bool:
        """Whether the parameter can take `value` (a choice, or a number in range on its step)."""
        if self.kind in ("categorical", "pow2"):
            return value in self.options(cap)
        if not _is_number(value) or (self.kind == "int" and value != int(value)):
            return False
        low, high = self.bounds(cap)
        steps = (value - low) / self.step if self.step else 0.0
        on_step = math.isclose(steps, round(steps), abs_tol=1e-9)  # 0.3 / 0.1 = 2.9999...
        return low <= value <= high and on_step

    def allowed(self, cap: int | None = None) -> str:
        """What `holds` accepts, in words: "one of [16, 32]", "a number in [0.001, 0.1]"."""
        if self.kind in ("categorical", "pow2"):
            return f"one of {self.options(cap)}"
        low, high = self.bounds(cap)
        step = f" on steps of {self.step:g}" if self.step else ""
        return f"a{'n int' if self.kind == 'int' else ' number'} in [{low:g}, {high:g}]{step}"

    def pow2_choices(self, cap: int | None = None) -> list[int]:
        assert self.low is not None and self.high is not None
        upper = self.high if cap is None else min(self.high, cap)
        first = math.ceil(math.log2(self.low))
        return [2**e for e in range(first, math.floor(math.log2(upper)) + 1) if 2**e >= self.low]


class LrScalingSpec(_Model):
    """Batch-size / learning-rate coupling: `lr` is the base LR at `reference_batch_size`."""

    rule: Literal["sqrt", "linear"] = "sqrt"
    reference_batch_size: int = Field(32, ge=1)


class SamplerSpec(_Model):
    type: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = Field(8, ge=0)
    multivariate: bool = True
    #: The study's first trial (`search.space.start_params`): `none` (every trial from the
    #: sampler), the known-good `defaults`, or values for some parameters (the rest as
    #: defaults). `none` by default: a start measured no sooner to quality (see the README).
    start: Literal["defaults", "none"] | dict[str, Scalar] = "none"

    @field_validator("start", mode="before")
    @classmethod
    def _start_kind(cls, value: Any) -> Any:
        if not isinstance(value, dict) and value not in ("defaults", "none"):
            raise ValueError(
                f"must be defaults, none or a mapping of parameter values, but got {value!r}"
            )
        return value


class PruningSpec(BaseModel):
    """`pruner` picks the rule set; every other key is a keyword of that pruner."""

    model_config = ConfigDict(extra="allow", frozen=True)

    pruner: str = "default"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EarlyStoppingSpec(_Model):
    patience: int | None = Field(None, ge=1)
    min_delta: float = Field(0.0, ge=0)


class ObjectiveSpec(_Model):
    """Either the built-in trainer (`dataset`, `model`) or a user function `pkg.mod:func`."""

    function: str | None = None
    dataset: Literal["digits", "wine", "breast_cancer"] = "digits"
    model: Literal["mlp"] = "mlp"

    @field_validator("function")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                import_objective(value)
            except ObjectiveError as e:
                raise ValueError(str(e)) from e
        return value


class WorkersSpec(_Model):
    heartbeat_interval: int = Field(5, ge=1)
    grace_period: int = Field(20, ge=2)
    max_retries: int = Field(1, ge=0)
    max_failures: int | None = Field(None, ge=1)  # None: max(5, n_trials)
    checkpoint_dir: str | None = None
    #: What stays in the checkpoint folder when a trial ends: nothing, or a completed trial's
    #: best-epoch weights (`trial-<root>.best.pt`).
    keep_checkpoints: Literal["none", "best"] = "none"
    oom_grad_accumulation: bool = False
    #: Replace the worker process by a fresh one (exit code 75) after this many trials.
    recycle_after: int | None = Field(None, ge=1)
    epoch_timeout: float | None = Field(None, gt=0)  # seconds between two reports
    trial_timeout: float | None = Field(None, gt=0)  # seconds from claim to the end

    @model_validator(mode="after")
    def _grace_exceeds_interval(self) -> WorkersSpec:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period}) must be > heartbeat_interval "
                f"({self.heartbeat_interval})"
            )
        return self


class StudySpec(_Model):
    """A whole study definition, as read from `studies/*.yaml`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=120)
    direction: Literal["minimize", "maximize"] = "minimize"
    metric: str = "val_loss"
    n_trials: int = Field(20, ge=1)
    epochs: int = Field(20, ge=1)
    seed: int | None = 0
    sampler: SamplerSpec = SamplerSpec()
    space: dict[str, ParamSpec]
    lr_scaling: LrScalingSpec | None = None
    max_batch_size: int | None = Field(None, ge=1)
    pruning: PruningSpec = PruningSpec()
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    workers: WorkersSpec = WorkersSpec()
    storage: str | None = None

    @field_validator("space")
    @classmethod
    def _space_not_empty(cls, value: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not value:
            raise ValueError("the search space needs at least one parameter")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> StudySpec:
        names = list(self.space)
        for i, (name, param) in enumerate(self.space.items()):
            for parent in param.when or {}:
                if parent not in names[:i] or self.space[parent].kind != "categorical":
                    raise ValueError(
                        f"space.{name}.when: {parent!r} must be a categorical parameter "
                        "listed before it"
                    )
        if self.objective.function is None:
            missing = [p for p in FIRST_CLASS_PARAMS if p not in self.space]
            if missing:
                raise ValueError(f"the built-in trainer needs space entries for {missing}")
        if self.lr_scaling is not None and not {"lr", "batch_size"} <= set(self.space):
            raise ValueError("lr_scaling needs both lr and batch_size in the space")
        if isinstance(self.sampler.start, dict):
            self._check_start(self.sampler.start)
        batch = self.space.get("batch_size")
        cap = self.max_batch_size
        pow2 = batch is not None and batch.kind == "pow2"
        if cap is not None and batch is not None and pow2 and not batch.pow2_choices(cap):
            raise ValueError(f"max_batch_size={cap} excludes every batch size")
        return self

    def _check_start(self, start: dict[str, Scalar]) -> None:
        for name, value in start.items():
            if name not in self.space:
                raise ValueError(f"sampler.start.{name}: not a parameter of the space")
            param, cap = self.space[name], self.cap_of(name)
            if not param.holds(value, cap):
                raise ValueError(f"sampler.start.{name}: {value!r} is not {param.allowed(cap)}")
        from search.space import start_params  # space reads the spec: imported late

        inactive = sorted(set(start) - set(start_params(self)))
        if inactive:
            raise ValueError(
                f"sampler.start.{inactive[0]}: its `when` condition does not hold at the start"
            )

    def cap_of(self, name: str) -> int | None:
        """The cap on the values of parameter `name`: `max_batch_size` for `batch_size`."""
        return self.max_batch_size if name == "batch_size" else None

    def resolved(self) -> dict[str, Any]:
        """The spec with every default filled in, as stored on the study."""
        return self.model_dump(mode="json")


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file.

    Raises:
        SpecError: the file is missing, is not YAML, or fails validation; the message names the
            file and the field path.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the study file ({e.strerror})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from e
    return spec_from_dict(data, source=str(path))


def spec_from_dict(data: Any, *, source: str = "<spec>") -> StudySpec:
    """Validate an already-parsed spec (e.g. the copy stored on a study)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the study file must be a mapping of fields, not {data!r:.40}")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: {_describe(e)}") from e
    _check_pruning(spec, source)
    return spec


def _check_pruning(spec: StudySpec, source: str) -> None:
    from search.pruning import make_pruner

    try:
        make_pruner(spec.pruning.pruner, spec.pruning.options())
    except (TypeError, ValueError) as e:
        raise SpecError(f"{source}: pruning: {e}") from e


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-after"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "literal_error":
            message = f"{message}, but got {item['input']!r}"
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)


def import_objective(reference: str) -> Callable[..., Any]:
    """Import `package.module:function` and check it takes `(params, device, report)`."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not re.fullmatch(r"[\w.]+", module_name) or not attr.isidentifier():
        raise ObjectiveError(
            f"objective must look like 'package.module:function', got {reference!r}"
        )
    if os.getcwd() not in sys.path:  # as `python -m` does: the user's code is where they run
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ObjectiveError(f"cannot import module {module_name!r} ({e})") from e
    function = getattr(module, attr, None)
    if not callable(function):
        raise ObjectiveError(f"module {module_name!r} has no callable {attr!r}")
    try:
        inspect.signature(function).bind({}, "cpu", lambda step, metrics: None)
    except TypeError as e:
        raise ObjectiveError(
            f"{reference} must accept (params, device, report), but its signature is "
            f"{inspect.signature(function)}"
        ) from e
    return function


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value: float | None) -> bool:
    return value is not None and float(value).is_integer()
