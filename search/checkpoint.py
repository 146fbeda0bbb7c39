"""Per-trial checkpoints on a (possibly shared) filesystem.

A trial's checkpoint is keyed by its *root* trial number: a retried trial (same parameters,
new number) finds the checkpoint of the trial it replaces and resumes from its last epoch.
User objectives get the same by accepting a `checkpoint` keyword argument::

    def train(params, device, report, checkpoint=None):
        state = checkpoint.load() if checkpoint else None   # dict or None
        ...
        checkpoint.save({"epoch": epoch, "model": model.state_dict()})
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any


class Checkpoint:
    """One trial's checkpoint file, written atomically (temp file + rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None if there is none (or it is unreadable)."""
        import torch

        if not self.path.exists():
            return None
        try:
            state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=False)
        except (OSError, EOFError, RuntimeError):
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Replace the checkpoint with `state`; a crash mid-write leaves the old one intact."""
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def checkpoint_for(directory: str | Path, study_name: str, root_trial_number: int) -> Checkpoint:
    """The checkpoint of the retry chain that starts at `root_trial_number`."""
    return Checkpoint(Path(directory) / study_name / f"trial-{root_trial_number}.pt")
