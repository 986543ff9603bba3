"""What a run writes into its job directory, each file written atomically.

* ``results.json``     - the run's record: config, metrics, per-epoch history, status;
* ``model.pt``         - the final model's state_dict with the config that built it;
* ``checkpoint.pt``    - while training: everything needed to resume after the last finished epoch;
* ``predictions.npz``  - test-set predictions of the final model (index, target, pred);
* ``model_summary.txt``- the per-layer summary and parameter count.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import NormsweepError

RESULTS_FILE = "results.json"
MODEL_FILE = "model.pt"
TRAINING_STATE_FILE = "checkpoint.pt"  # resume state, rewritten every epoch, removed when the run completes
PREDICTIONS_FILE = "predictions.npz"
SUMMARY_FILE = "model_summary.txt"


class WriteError(NormsweepError, OSError):
    """A file could not be written (disk full, read-only directory); its previous version is intact."""


class UnsafeFileError(NormsweepError, pickle.UnpicklingError):
    """A torch file that holds more than tensors and plain data: refused before anything in it ran."""


def _write_advice(err: OSError, directory: Path) -> str:
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"the disk (or quota) holding {directory} is full: free disk space there, or write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{directory} is not writable: check its permissions and that its filesystem is not read-only"
    return f"check that {directory} is writable and its disk has free space"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; skipped where a directory cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # filesystems that cannot sync a directory say so; anything else is an error
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync it, rename it onto ``path``, fsync the directory.

    Readers see the old file or the new one, complete, and after a power cut the new one is not
    empty. If anything fails (disk full, read-only directory), the temporary file is removed, the
    previous ``path`` is left as it was, and an OSError is raised as :class:`WriteError`, naming
    the file and what to do.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)  # the data reaches the disk before the name does
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except WriteError:
        raise
    except OSError as e:
        err = WriteError(
            f"could not write {path} ({e.strerror or e}); {_write_advice(e, path.parent)}. "
            f"The previous {path.name}, if any, is intact"
        )
        err.errno = e.errno
        raise err from e
    except RuntimeError as e:
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        # torch.save to a path reports a failed write (a full disk) only as a zip-writer error
        raise WriteError(
            f"could not write {path} (torch: {e}); check that {path.parent} is writable and its disk has free "
            f"space. The previous {path.name}, if any, is intact"
        ) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_results(job_dir: str | Path) -> dict:
    return json.loads((Path(job_dir) / RESULTS_FILE).read_text())


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically, through a Python file so that a full disk is reported as such."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def load_torch(path: str | Path) -> Any:
    """``torch.load`` that never executes code: tensors, dicts, lists, tuples, numbers, strings, None.

    ``weights_only=True``: any other object in the file (a class, a function: what a crafted file
    uses to run code while it is read) is refused before it is called, as :class:`UnsafeFileError`.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a reference to {found.group(1)}" if found else "something other than tensors and plain data"
        raise UnsafeFileError(
            f"refused to load {path}: it holds {what}, which normsweep never writes and which could run code "
            f"when loaded; nothing in it was run. The file is damaged or was not written by normsweep: "
            f"delete it (or write it again with normsweep)"
        ) from None


def load_model(path: str | Path) -> dict:
    """``model.pt``: ``state_dict``, the ``config`` that built it, the ``classes``; never executes code."""
    blob = load_torch(path)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ValueError(f"{path} is not a normsweep model file (no state_dict)")
    return blob


def save_model(path: str | Path, model: torch.nn.Module, config: dict, classes: tuple[str, ...]) -> None:
    blob = {"state_dict": model.state_dict(), "config": config, "classes": list(classes)}
    save_torch(path, blob)


def save_predictions(path: str | Path, index: torch.Tensor, target: torch.Tensor, pred: torch.Tensor) -> None:
    arrays = {"index": index.cpu().numpy(), "target": target.cpu().numpy(), "pred": pred.cpu().numpy()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending '.npz' to the name
            np.savez(f, **arrays)

    atomic_write(path, write)
