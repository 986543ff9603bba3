"""What a run writes into its job directory, each file written atomically.

* ``results.json``     - the run's record: config, metrics, per-epoch history, status;
* ``model.pt``         - the final model's state_dict with the config that built it;
* ``checkpoint.pt``    - while training: everything needed to resume after the last finished epoch;
* ``predictions.npz``  - test-set predictions of the final model (index, target, pred);
* ``model_summary.txt``- the per-layer summary and parameter count.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_FILE = "results.json"
MODEL_FILE = "model.pt"
TRAINING_STATE_FILE = "checkpoint.pt"  # resume state, rewritten every epoch, removed when the run completes
PREDICTIONS_FILE = "predictions.npz"
SUMMARY_FILE = "model_summary.txt"


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_results(job_dir: str | Path) -> dict:
    return json.loads((Path(job_dir) / RESULTS_FILE).read_text())


def save_model(path: str | Path, model: torch.nn.Module, config: dict, classes: tuple[str, ...]) -> None:
    blob = {"state_dict": model.state_dict(), "config": config, "classes": list(classes)}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def save_predictions(path: str | Path, index: torch.Tensor, target: torch.Tensor, pred: torch.Tensor) -> None:
    arrays = {"index": index.cpu().numpy(), "target": target.cpu().numpy(), "pred": pred.cpu().numpy()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending '.npz' to the name
            np.savez(f, **arrays)

    atomic_write(path, write)
