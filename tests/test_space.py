"""Search-space sampling: bounds, log scale, powers of two, coupling, conditional params."""

from __future__ import annotations

import math

import optuna
import pytest
from conftest import base_spec, sleepy_spec

from search.space import scaled_lr, start_params, suggest, trainer_params
from search.spec import LrScalingSpec, spec_from_dict


def _sample(spec_data: dict, n: int = 60, seed: int = 0) -> list[dict]:
    spec = spec_from_dict(spec_data)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rows = []
    for _ in range(n):
        trial = study.ask()
        rows.append(suggest(trial, spec))
        study.tell(trial, 0.0)
    return rows


def test_values_stay_in_bounds_and_are_optuna_params() -> None:
    spec = spec_from_dict(base_spec("s"))
    trial = optuna.create_study().ask()
    params = suggest(trial, spec)
    assert set(trial.params) == set(params) == {"lr", "batch_size", "depth", "width"}
    for row in _sample(base_spec("s")):
        assert 1e-3 <= row["lr"] <= 1e-1
        assert row["batch_size"] in (16, 32)
        assert 1 <= row["depth"] <= 2 and isinstance(row["depth"], int)


def test_log_scale_spreads_over_decades() -> None:
    rows = _sample(base_spec("s", space={**base_spec("s")["space"],
                                         "lr": {"low": 1e-5, "high": 1e-1, "log": True}}), n=200)
    decades = {math.floor(math.log10(r["lr"])) for r in rows}
    assert decades == {-5, -4, -3, -2}


def test_pow2_batch_sizes_respect_the_cap() -> None:
    space = {**base_spec("s")["space"], "batch_size": {"type": "pow2", "low": 16, "high": 512}}
    rows = _sample(base_spec("s", space=space, max_batch_size=100), n=80)
    assert {r["batch_size"] for r in rows} == {16, 32, 64}


@pytest.mark.parametrize(("rule", "factor"), [("sqrt", 2.0), ("linear", 4.0)])
def test_lr_scaling_rule(rule: str, factor: float) -> None:
    scaling = LrScalingSpec(rule=rule, reference_batch_size=32)
    assert scaled_lr(0.01, 128, scaling) == pytest.approx(0.01 * factor)
    assert scaled_lr(0.01, 32, scaling) == pytest.approx(0.01)


def test_effective_lr_goes_to_the_trainer_and_the_record() -> None:
    spec = spec_from_dict(base_spec("s", lr_scaling={"rule": "sqrt", "reference_batch_size": 16}))
    train, derived = trainer_params({"lr": 0.01, "batch_size": 64, "depth": 1, "width": 8}, spec)
    assert train["lr"] == pytest.approx(0.02)
    assert derived == {"base_lr": 0.01, "effective_lr": pytest.approx(0.02)}


def test_without_scaling_params_pass_through() -> None:
    spec = spec_from_dict(base_spec("s"))
    params = {"lr": 0.01, "batch_size": 64, "depth": 1, "width": 8}
    assert trainer_params(params, spec) == (params, {})


def test_conditional_param_only_when_parent_matches() -> None:
    space = {**base_spec("s")["space"],
             "optimizer": {"choices": ["adam", "sgd"]},
             "momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": "sgd"}}}
    rows = _sample(base_spec("s", space=space), n=40)
    assert any(r["optimizer"] == "sgd" for r in rows)
    assert any(r["optimizer"] == "adam" for r in rows)
    for row in rows:
        assert ("momentum" in row) == (row["optimizer"] == "sgd")


def test_fixed_trial_gives_the_fixed_values() -> None:
    spec = spec_from_dict(base_spec("s"))
    fixed = {"lr": 0.01, "batch_size": 32, "depth": 2, "width": 16}
    assert suggest(optuna.trial.FixedTrial(fixed), spec) == fixed


# --- the study's first trial (sampler.start) ------------------------------------------------

_TRAINER_SPACE = {
    "lr": {"low": 1e-4, "high": 1.0, "log": True},
    "batch_size": {"type": "pow2", "low": 16, "high": 256},
    "depth": {"low": 1, "high": 4},
    "width": {"low": 16, "high": 256, "log": True},
    "optimizer": {"choices": ["sgd", "adam"]},
    "momentum": {"low": 0.5, "high": 0.99, "when": {"optimizer": "sgd"}},
    "schedule": {"choices": ["constant", "step", "cosine"]},
    "dropout": {"low": 0.0, "high": 0.8, "step": 0.2},
}


def _start(space: dict | None = None, **overrides: object) -> dict:
    spec = base_spec("s", space=space or _TRAINER_SPACE, sampler={"start": "defaults"})
    return start_params(spec_from_dict({**spec, **overrides}))


def test_the_trainer_starts_at_the_recipe_where_the_space_allows_and_mid_range_elsewhere() -> None:
    assert _start() == {
        "lr": 1e-3, "batch_size": 32, "depth": 2, "width": 64, "optimizer": "adam",
        "schedule": "cosine", "dropout": pytest.approx(0.4),
    }  # momentum only goes with sgd


@pytest.mark.parametrize(("changes", "expected"), [
    ({"lr": {"low": 0.01, "high": 1.0, "log": True}}, {"lr": pytest.approx(0.1)}),
    ({"optimizer": {"choices": ["sgd"]}}, {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9}),
    ({"batch_size": {"type": "pow2", "low": 64, "high": 1024}}, {"batch_size": 256}),
    ({"batch_size": {"choices": [64, 128]}}, {"batch_size": 64}),
    ({"schedule": {"choices": ["step", "constant"]}}, {"schedule": "step"}),
])
def test_a_recipe_value_the_space_lacks_gives_way_to_the_middle_or_the_first_choice(
        changes: dict, expected: dict) -> None:
    start = _start({**_TRAINER_SPACE, **changes})
    assert {name: start[name] for name in expected} == expected


def test_lr_scaling_starts_at_its_reference_batch_and_max_batch_size_caps_the_middle() -> None:
    assert _start(lr_scaling={"rule": "sqrt", "reference_batch_size": 64})["batch_size"] == 64
    big = {**_TRAINER_SPACE, "batch_size": {"type": "pow2", "low": 64, "high": 4096}}
    assert _start(big)["batch_size"] == 512
    assert _start(big, max_batch_size=256)["batch_size"] == 128


def test_a_user_objective_starts_at_the_middle_of_every_range() -> None:
    spec = spec_from_dict(sleepy_spec("s", sampler={"start": "defaults"}, space={
        "lr": {"low": 1e-4, "high": 1.0, "log": True},
        "x": {"type": "float", "low": -1.0, "high": 3.0},
        "optimizer": {"choices": ["sgd", "adam"]},
        "layers": {"low": 1, "high": 8, "step": 3},
    }))
    assert start_params(spec) == {"lr": pytest.approx(1e-2), "x": 1.0, "optimizer": "sgd",
                                  "layers": 4}


def test_given_start_values_replace_the_defaults_and_none_is_the_default() -> None:
    given = spec_from_dict(base_spec("s", space=_TRAINER_SPACE,
                                     sampler={"start": {"optimizer": "sgd", "momentum": 0.95}}))
    assert start_params(given) == {**_start(), "optimizer": "sgd", "lr": 0.01, "momentum": 0.95}
    assert start_params(spec_from_dict(base_spec("s", space=_TRAINER_SPACE))) == {}


def test_the_start_is_what_the_first_trial_samples() -> None:
    spec = spec_from_dict(base_spec("s", space=_TRAINER_SPACE, sampler={"start": "defaults"}))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(start_params(spec))
    assert suggest(study.ask(), spec) == start_params(spec)


def test_a_given_start_on_a_float_step_is_accepted_despite_rounding() -> None:
    space = {**_TRAINER_SPACE, "dropout": {"low": 0.0, "high": 0.5, "step": 0.1}}
    spec = spec_from_dict(base_spec("s", space=space, sampler={"start": {"dropout": 0.3}}))
    assert start_params(spec)["dropout"] == 0.3
