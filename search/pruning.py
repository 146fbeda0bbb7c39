"""Pruners. (Placeholder: the divergence-aware pruner lands with issue 3.)"""

from __future__ import annotations

from typing import Any

import optuna


def default_pruner() -> optuna.pruners.BasePruner:
    """The pruner a study gets when its spec says nothing about pruning."""
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)


def make_pruner(name: str, options: dict[str, Any]) -> optuna.pruners.BasePruner:
    """Build the pruner named in a spec's `pruning.pruner` with its keyword options."""
    if name == "default":
        if options:
            raise ValueError(f"pruner 'default' takes no options, got {sorted(options)}")
        return default_pruner()
    if name == "none":
        return optuna.pruners.NopPruner(**options)
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    raise ValueError(f"unknown pruner {name!r}; use one of default, median, none")
