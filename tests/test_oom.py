"""Out-of-memory handling (search/oom.py): what is recorded, what is skipped, accumulation."""

from __future__ import annotations

import optuna
import pytest

from search.oom import OomRegistry, is_out_of_memory, oom_shape
from search.storage import open_storage


def test_cuda_and_host_out_of_memory_are_recognised() -> None:
    import torch

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to ..."))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_the_shape_that_did_not_fit_is_the_micro_batch() -> None:
    params = {"batch_size": 256, "depth": 3, "width": 512, "lr": 0.1}
    assert oom_shape(params, 1) == {"batch_size": 256, "depth": 3, "width": 512}
    assert oom_shape(params, 4) == {"batch_size": 64, "depth": 3, "width": 512}


@pytest.fixture
def study(sqlite_url: str) -> optuna.Study:
    return optuna.create_study(storage=open_storage(sqlite_url))


def test_configs_at_least_as_large_are_blocked_on_that_device_type(study: optuna.Study) -> None:
    registry = OomRegistry(study, "cpu")
    registry.record({"batch_size": 64, "width": 128}, trial_number=3)
    assert registry.blocking_record({"batch_size": 128, "width": 128, "depth": 2}) == {
        "batch_size": 64, "width": 128}
    assert registry.blocking_record({"batch_size": 128, "width": 64}) is None
    assert OomRegistry(study, "cpu").records() == [{"batch_size": 64, "width": 128, "trial": 3}]


def test_accumulation_halves_the_micro_batch_below_every_oom_batch(study: optuna.Study) -> None:
    study.set_user_attr("spec", {"workers": {"oom_grad_accumulation": True}})
    registry = OomRegistry(study, "cpu")
    assert registry.accumulation({"batch_size": 256, "width": 64}) == 1
    registry.record({"batch_size": 128, "width": 64}, trial_number=0)
    assert registry.accumulation({"batch_size": 256, "width": 64}) == 4
    assert registry.blocking_record({"batch_size": 256, "width": 64}) is None
