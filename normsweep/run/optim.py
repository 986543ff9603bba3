"""The optimizers and learning-rate schedules: one registry each, :data:`OPTIMIZERS` (``optimizer.name``)
and :data:`SCHEDULERS` (``scheduler.name``); the schema's allowed names are derived from them.

An optimizer entry builds the torch optimizer from the parameters, the ``optimizer.*`` settings and the
peak learning rate; a schedule entry maps (``scheduler.*`` settings, progress in [0, 1]) to the learning
rate as a fraction of the peak. This module imports nothing of normsweep above ``base``, so the schema
can read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from normsweep.base.registry import Registry

# (params, optimizer.* settings, peak lr) -> the optimizer
OPTIMIZERS: Registry[Callable[[Any, Any, float], torch.optim.Optimizer]] = Registry("optimizer.name")
OPTIMIZERS.register(
    "sgd",
    lambda params, c, lr: torch.optim.SGD(
        params, lr=lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay
    ),
)
OPTIMIZERS.register("adam", lambda params, c, lr: torch.optim.Adam(params, lr=lr, weight_decay=c.weight_decay))
OPTIMIZERS.register("adamw", lambda params, c, lr: torch.optim.AdamW(params, lr=lr, weight_decay=c.weight_decay))

# (scheduler.* settings, progress in [0, 1]) -> the learning rate as a fraction of the peak
SCHEDULERS: Registry[Callable[[Any, float], float]] = Registry("scheduler.name")
SCHEDULERS.register("none", lambda c, progress: 1.0)
SCHEDULERS.register(
    "cosine", lambda c, progress: c.final_lr_frac + (1 - c.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
)


@SCHEDULERS.register("onecycle")
def onecycle(c: Any, progress: float) -> float:
    """Linear up to the peak over ``scheduler.warmup_frac`` of the steps, then linear down to ``final_lr_frac``."""
    if progress < c.warmup_frac:
        return progress / c.warmup_frac
    return 1.0 - (1.0 - c.final_lr_frac) * (progress - c.warmup_frac) / (1 - c.warmup_frac)
