"""Study files: valid ones load; each kind of bad input gives one clear line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, base_spec

from search.exceptions import SpecError
from search.spec import load_spec, spec_from_dict


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name and spec.space


def test_defaults_are_filled_in_the_resolved_spec() -> None:
    resolved = spec_from_dict(base_spec("x")).resolved()
    assert resolved["pruning"]["pruner"] == "default"
    assert resolved["workers"]["max_retries"] == 1
    assert resolved["space"]["lr"]["log"] is True


def _with(**changes: object) -> dict:
    spec = base_spec("bad")
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(leaf)
        else:
            node[leaf] = value
    return spec


_DELETE = object()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_with(colour="blue"), "colour: unknown field"),
        (_with(n_trials="many"), "n_trials: Input should be a valid integer"),
        (_with(n_trials=0), "n_trials: Input should be greater than or equal to 1"),
        (_with(space__lr={"low": 0.1, "high": 0.001, "log": True}),
         "space.lr: low (0.1) must be < high (0.001)"),
        (_with(space__lr={"low": 0.0, "high": 0.1, "log": True}),
         "space.lr: a log-scale parameter needs low > 0"),
        (_with(space__batch_size={"choices": []}),
         "space.batch_size: choices must be a non-empty"),
        (_with(space__depth={"low": 1}),
         "space.depth: a parameter needs both low and high, or a list of choices"),
        (_with(objective={"dataset": "imagenet"}),
         "objective.dataset: Input should be 'digits', 'wine' or 'breast_cancer', but got "
         "'imagenet'"),
        (_with(objective={"function": "no_such_module_xyz:train"}),
         "objective.function: cannot import module 'no_such_module_xyz'"),
        (_with(objective={"function": "json:nothing_here"}),
         "objective.function: module 'json' has no callable 'nothing_here'"),
        (_with(objective={"function": "not a reference"}),
         "objective.function: objective must look like 'package.module:function'"),
        (_with(direction="up"), "direction: Input should be 'minimize' or 'maximize'"),
        (_with(space__depth=_DELETE), "the built-in trainer needs space entries for ['depth']"),
        (_with(space__momentum={"low": 0.5, "high": 0.9, "type": "float",
                                "when": {"optimizer": "sgd"}}),
         "space.momentum.when: 'optimizer' must be a categorical parameter listed before it"),
        (_with(workers={"heartbeat_interval": 10, "grace_period": 5}),
         "grace_period (5) must be > heartbeat_interval (10)"),
        (_with(pruning={"pruner": "oracle"}), "pruning: unknown pruner 'oracle'"),
        (_with(name="has space"), "name: String should match pattern"),
        (_with(sampler={"start": {"lr": 5.0}}),
         "sampler.start.lr: 5.0 is not a number in [0.001, 0.1]"),
        (_with(sampler={"start": {"batch_size": 64}}),
         "sampler.start.batch_size: 64 is not one of [16, 32]"),
        (_with(sampler={"start": {"depth": 1.5}}),
         "sampler.start.depth: 1.5 is not an int in [1, 2]"),
        (_with(sampler={"start": {"colour": 1}}),
         "sampler.start.colour: not a parameter of the space"),
        (_with(space__optimizer={"choices": ["adam", "sgd"]},
               space__momentum={"low": 0.5, "high": 0.9, "when": {"optimizer": "sgd"}},
               sampler={"start": {"momentum": 0.8}}),
         "sampler.start.momentum: its `when` condition does not hold at the start"),
        (_with(sampler={"start": "random"}),
         "sampler.start: must be defaults, none or a mapping of parameter values, "
         "but got 'random'"),
        ([1, 2], "must be a mapping of fields"),
    ],
)
def test_bad_spec_gives_clear_error(data: object, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, source="studies/bad.yaml")
    message = str(info.value)
    assert message.startswith("studies/bad.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nspace:\n  lr: {low: 1\n")
    with pytest.raises(SpecError, match=r"broken\.yaml: malformed YAML at line \d+, column \d+"):
        load_spec(path)


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the study file"):
        load_spec(tmp_path / "nope.yaml")


def test_user_objective_with_wrong_signature_is_refused() -> None:
    data = _with(objective={"function": "json:dumps"})
    with pytest.raises(SpecError, match="must accept \\(params, device, report\\)"):
        spec_from_dict(data)
