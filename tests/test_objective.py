"""The training function a study runs (search/objective.py) and what it may return."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import base_spec

from search.objective import (
    build_training_function,
    call_training,
    describe_returned,
    returned_value,
)
from search.spec import spec_from_dict


@pytest.mark.parametrize(
    ("returned", "expected"),
    [(0.5, 0.5), (3, 3.0), (np.float64(0.25), 0.25), (math.nan, None), (math.inf, None),
     (None, None), ("0.5", None), (True, None)],
)
def test_a_returned_value_is_a_finite_number_or_none(returned: object,
                                                     expected: float | None) -> None:
    assert returned_value(returned) == expected


def test_a_zero_dimensional_tensor_is_accepted_and_a_vector_is_not() -> None:
    import torch

    assert returned_value(torch.tensor(0.75)) == 0.75
    assert returned_value(torch.zeros(3)) is None
    assert describe_returned(torch.zeros(3)) == "Tensor of shape (3,)"
    assert describe_returned(None) == "NoneType None"


def test_optional_keywords_are_passed_only_when_accepted() -> None:
    seen: dict[str, object] = {}

    def plain(params, device, report):  # type: ignore[no-untyped-def]
        seen["plain"] = True

    def with_checkpoint(params, device, report, checkpoint=None):  # type: ignore[no-untyped-def]
        seen["checkpoint"] = checkpoint

    call_training(plain, {}, "cpu", lambda s, m: None, checkpoint="ck", accumulation_steps=2)
    call_training(with_checkpoint, {}, "cpu", lambda s, m: None, checkpoint="ck")
    assert seen == {"plain": True, "checkpoint": "ck"}


def test_the_built_in_trainer_gets_the_specs_dataset_and_epochs() -> None:
    function = build_training_function(spec_from_dict(base_spec("x", epochs=2)))
    assert function.keywords == {"dataset": "wine", "epochs": 2, "seed": 0}  # type: ignore[attr-defined]
