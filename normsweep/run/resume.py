"""Resuming a run: the checkpoint training continues from, and what a job directory already holds.

* :func:`save_checkpoint` / :func:`load_checkpoint`: ``checkpoint.pt``, the full training state
  after the last finished epoch (written by ``train.train`` every epoch, never executes code when read);
* :func:`previous_result`: the run a job directory already holds. The same config completed: the
  job is skipped; another config (completed, or with a checkpoint): refused, naming the keys that
  differ (:func:`config_differences`, which ignores ``config.RESULT_NEUTRAL_KEYS``);
* :func:`resume_hint`: the command that resumes an interrupted run.

It does not import ``train`` (``train`` imports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from normsweep.base.results import (
    RESULTS_FILE,
    TRAINING_STATE_FILE,
    EpochRecord,
    RunRecord,
    UnsafeFileError,
    load_torch,
    save_torch,
)
from normsweep.config import NormsweepError, dotted, is_result_neutral, schema_defaults

CHECKPOINT_VERSION = 1


class CheckpointError(NormsweepError, RuntimeError):
    """A checkpoint that cannot be resumed from."""


def save_checkpoint(
    path: Path,
    model,
    opt,
    sched,
    gen: torch.Generator,
    history: list[EpochRecord],
    config: dict,
    ema: Any = None,
) -> None:
    """Everything needed to continue training exactly where it stopped, written atomically.

    ``ema``: the ``train.WeightEMA`` of the run, if it has one.
    """
    state = {
        "ema": ema.state_dict() if ema is not None else None,
        "version": CHECKPOINT_VERSION,
        "epoch": history[-1].epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": [h.as_dict() for h in history],
        "config": config,
    }
    save_torch(path, state)  # atomic; a full disk is reported as such


def load_checkpoint(path: Path) -> dict:
    """The resume state in ``path``, read with ``weights_only=True``: loading it never runs code.

    A checkpoint holds only tensors (the generator state is a ByteTensor), dicts, lists, tuples,
    numbers, strings and None, which torch's safe unpickler admits without an allow-list; a file
    naming anything else is refused (``results.UnsafeFileError``) as a CheckpointError.
    """
    try:
        state = load_torch(path)
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        if version != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {version}, expected {CHECKPOINT_VERSION}")
        return state
    except UnsafeFileError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from e
    except Exception as e:
        raise CheckpointError(
            f"cannot resume from {path}: {type(e).__name__}: {e}; delete it to start this run afresh"
        ) from e


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two run configs, ignoring those that do not affect results.

    A key one config lacks counts as its schema default (:func:`~normsweep.config.schema_defaults`): a run
    recorded before ``data.source`` or ``model.name`` existed is the same config as today's with those at
    their defaults, so it resumes (or is skipped as done) instead of being refused.
    """
    a, b, defaults = dotted(old), dotted(new), schema_defaults()
    missing = object()

    def value(config: dict, key: str):
        return config.get(key, defaults.get(key, missing))

    return sorted(k for k in a.keys() | b.keys() if value(a, k) != value(b, k) and not is_result_neutral(k))


def previous_result(out: Path, config: dict) -> RunRecord | None:
    """The completed record in ``out`` for this same config, if any; refuses a different config."""
    if not (out / RESULTS_FILE).exists():
        return None
    try:
        previous = RunRecord.read(out)
    except ValueError:
        return None  # unreadable: treat the run as not done; it will be rewritten
    diff = config_differences(previous.config, config)
    if diff and (previous.status == "completed" or (out / TRAINING_STATE_FILE).exists()):
        raise CheckpointError(
            f"{out.resolve()} already holds a run with another config (differs in {', '.join(diff)}); "
            f"pass another hydra.run.dir / hydra.sweep.dir, or delete that directory"
        )
    return previous if previous.status == "completed" else None


def resume_hint(out: Path) -> str:
    """What to run to resume the run in ``out``."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"run the same command with hydra.sweep.dir={HydraConfig.get().sweep.dir} to resume"
    return f"run the same command with hydra.run.dir={out.resolve()} to resume"
