"""What a training job knows of a search: a hook the search worker installs around each trial's job.

The job tells the hook each epoch's validation accuracy; the hook (``worker.py``, with Optuna's
pruner) may answer by raising :class:`RunPruned`. Keeping this here, without Optuna, lets a plain
training job run without importing the search machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional


class RunPruned(Exception):
    """The search stopped this run early (its pruner judged the run not worth finishing)."""


@dataclass(frozen=True)
class TrialHook:
    number: int  # the trial's number in its study, recorded in results.json
    report: Callable[[int, float, bool], None]  # (epoch, validation accuracy, last epoch); may raise RunPruned


# The hook of the job running now: set by the search worker around each trial's job, else None.
ACTIVE: Optional[TrialHook] = None


def report_epoch(epoch: int, val_acc: float, last: bool = False) -> None:
    """Tell the active trial, if any, this epoch's validation accuracy (may raise :class:`RunPruned`, never
    after the ``last`` epoch: a run that has trained all its epochs is complete)."""
    if ACTIVE is not None:
        ACTIVE.report(epoch, val_acc, last)
