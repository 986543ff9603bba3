"""The pruners a search may use: one registry, :data:`PRUNERS` (``search.pruner``), from which the schema
takes its allowed names. Optuna is imported only when a pruner is built, so the schema (and a training job,
which never prunes by itself) does not load it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from normsweep.base.registry import Registry

# search.* settings -> an optuna.pruners.BasePruner
PRUNERS: Registry[Callable[[Any], Any]] = Registry("search.pruner")


@PRUNERS.register("median")
def median(c: Any) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=c.pruner_startup_trials, n_warmup_steps=c.min_resource)


@PRUNERS.register("none")
def none(c: Any) -> Any:
    import optuna

    return optuna.pruners.NopPruner()


@PRUNERS.register("threshold")
def threshold(c: Any) -> Any:
    import optuna

    return optuna.pruners.ThresholdPruner(lower=c.prune_below)


@PRUNERS.register("hyperband")
def hyperband(c: Any) -> Any:
    """Brackets of successive halving; the maximum resource is a trial's epochs."""
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=c.min_resource, reduction_factor=c.reduction_factor)


@PRUNERS.register("successive_halving")
def successive_halving(c: Any) -> Any:
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=c.min_resource, reduction_factor=c.reduction_factor)
