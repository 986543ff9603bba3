"""The model a config asks for (:func:`model_from_config`) and the study's budget (:func:`check_budget`)."""

from __future__ import annotations

import os
import sys

import torch
from hydra.core.hydra_config import HydraConfig
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
    if cfg.model.target is not None:  # model=custom imports the user's module
        launch_dir_importable()
    return MODELS.entry(cfg.model.arch).build(cfg.model, norm_choice(cfg), num_classes, image_size)


def launch_dir_importable() -> None:
    """The directory normsweep was launched in on ``sys.path``, as ``python -m`` puts it there: a Hydra job runs in
    its job directory (``hydra.job.chdir``), and the ``normsweep`` command's script directory is not the launch's."""
    launch = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()
    if launch not in sys.path:
        sys.path.insert(0, launch)


class BudgetError(NormsweepError, ValueError):
    """The run would break the study's limits (budget.*)."""


BUDGET_CLASSES = 10  # the study's budget was set for a 10-class head (CIFAR-10)


def budget_params(cfg: Config, params: int, num_classes: int = 10, image_size: int = 32) -> int:
    """The parameters the budget counts: the network with a 10-class head. A head for more classes adds
    parameters the study's budget never meant to count (a 100-class head adds about 5,000 to the default
    network), so they are left out: the count is that of the same network built for 10 classes (with fewer
    classes it is ``params``, the head's smaller size counted as it is; with ``budget.enforce=false`` too: no
    twin is built for a budget that is not checked)."""
    if num_classes <= BUDGET_CLASSES or not cfg.budget.enforce:
        return params
    with torch.random.fork_rng(devices=[]):  # building the twin leaves the run's random stream as it was
        twin = model_from_config(cfg, BUDGET_CLASSES, image_size)
    return sum(p.numel() for p in twin.parameters())


def check_budget(cfg: Config, params: int, num_classes: int = 10) -> None:
    """Stop a run over ``budget.*``; ``params`` as :func:`budget_params` counts them."""
    b = cfg.budget
    if not b.enforce:
        return
    if params > b.max_params:
        counted = (
            "" if num_classes <= BUDGET_CLASSES else f" with a 10-class head instead of its {num_classes} classes'"
        )
        raise BudgetError(
            f"the model has {params:,} parameters{counted}, over budget.max_params={b.max_params:,}; "
            f"choose a smaller model (model.widths) or pass budget=none (or budget.enforce=false) to go beyond on purpose"
        )
    if cfg.trainer.epochs > b.max_epochs:
        raise BudgetError(
            f"trainer.epochs={cfg.trainer.epochs} is over budget.max_epochs={b.max_epochs}; "
            f"lower it or pass budget=none (or budget.enforce=false) to go beyond on purpose"
        )
