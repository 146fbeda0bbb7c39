"""Out-of-memory handling: remember which configs did not fit on which device type.

A CUDA OOM fails the trial with `fail_reason=oom`. Its (batch_size, depth, width) is stored on
the study under `oom:<device type>`, and a later config at least as large in all three is not
run on that device type. With `workers.oom_grad_accumulation`, such a config is instead run
with gradient accumulation that keeps the same effective batch size.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

import optuna

from search import optuna_compat

logger = logging.getLogger(__name__)

SHAPE_KEYS = ("batch_size", "depth", "width")


def is_out_of_memory(error: BaseException) -> bool:
    """True for `torch.cuda.OutOfMemoryError` (or a RuntimeError saying CUDA ran out), and for
    a host `MemoryError`: either way the process is recycled after the trial."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)


def oom_shape(params: dict[str, Any], accumulation: int) -> dict[str, Any]:
    """The (batch_size, depth, width) that did not fit; with gradient accumulation the batch
    that ran out was the micro-batch."""
    shape: dict[str, Any] = {k: params[k] for k in SHAPE_KEYS if k in params}
    if accumulation > 1 and "batch_size" in shape:
        shape["batch_size"] = -(-shape["batch_size"] // accumulation)
    return shape


def release_device_memory(device: str) -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: str) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_mb(device: str) -> float | None:
    """Peak GPU memory allocated by this process since the last reset (None off-GPU)."""
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)


def device_type(device: str) -> str:
    """`cpu`, or the GPU's model name (OOM limits transfer between cards of one model)."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        return device
    return str(torch.cuda.get_device_name(torch.device(device)))


class OomRegistry:
    """The OOM configs recorded on a study for this worker's device type."""

    def __init__(self, study: optuna.Study, device: str) -> None:
        self.study = study
        self.key = f"oom:{device_type(device)}"
        spec = study.user_attrs.get("spec", {})
        self.accumulate = bool(spec.get("workers", {}).get("oom_grad_accumulation", False))

    def records(self) -> list[dict[str, Any]]:
        storage = optuna_compat.storage_of(self.study)
        return list(
            storage.get_study_system_attrs(optuna_compat.study_id(self.study)).get(self.key, [])
        )

    def record(self, shape: dict[str, Any], trial_number: int) -> None:
        """Append the config to the study's records in one transaction (no lock held apart)."""
        optuna_compat.append_study_system_attr(
            optuna_compat.storage_of(self.study),
            optuna_compat.study_id(self.study),
            self.key,
            {**shape, "trial": trial_number},
        )

    def blocking_record(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The recorded OOM config that `params` is at least as large as (None: go ahead)."""
        if self.accumulate:
            return None
        for record in self.records():
            if _at_least(params, record):
                return {k: record[k] for k in SHAPE_KEYS if k in record}
        return None

    def accumulation(self, params: dict[str, Any]) -> int:
        """Gradient-accumulation steps so each micro-batch is below every OOM batch it matches."""
        if not self.accumulate or "batch_size" not in params:
            return 1
        steps = 1
        for record in self.records():
            if _at_least(params, record) and "batch_size" in record:
                while (
                    params["batch_size"] / steps >= record["batch_size"]
                    and steps < params["batch_size"]
                ):
                    steps *= 2
        return steps


def _at_least(params: dict[str, Any], record: dict[str, Any]) -> bool:
    shared = [k for k in SHAPE_KEYS if k in record and k in params]
    return bool(shared) and all(params[k] >= record[k] for k in shared)
