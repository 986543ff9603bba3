"""The model a config asks for (:func:`model_from_config`) and the study's budget (:func:`check_budget`)."""

from __future__ import annotations

from torch import nn

from normsweep.base.errors import NormsweepError
from normsweep.base.registry import choice
from normsweep.config import Config
from normsweep.models import MODELS, NormChoice
from normsweep.norms import NORMS


def norm_choice(cfg: Config) -> NormChoice:
    kind = choice(cfg.norm.kind)
    options = {key: getattr(cfg.norm, key) for key in NORMS[kind].options}
    return NormChoice(kind, cfg.norm.groups, cfg.norm.ws, options)


def model_from_config(cfg: Config, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """The model ``cfg`` describes: ``model.*`` picks the network, ``norm.*`` its norm layers, the data its
    class count and image size."""
    return MODELS.entry(cfg.model.arch).build(cfg.model, norm_choice(cfg), num_classes, image_size)


class BudgetError(NormsweepError, ValueError):
    """The run would break the study's limits (budget.*)."""


def check_budget(cfg: Config, params: int) -> None:
    b = cfg.budget
    if not b.enforce:
        return
    if params > b.max_params:
        raise BudgetError(
            f"the model has {params:,} parameters, over budget.max_params={b.max_params:,}; "
            f"choose a smaller model (model.widths) or pass budget.enforce=false to go beyond on purpose"
        )
    if cfg.trainer.epochs > b.max_epochs:
        raise BudgetError(
            f"trainer.epochs={cfg.trainer.epochs} is over budget.max_epochs={b.max_epochs}; "
            f"lower it or pass budget.enforce=false to go beyond on purpose"
        )
