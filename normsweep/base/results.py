"""What a run writes into its job directory, each file written atomically.

* ``results.json``     - the run's record (:class:`RunRecord`): config, metrics, per-epoch history, status;
* ``model.pt``         - the final model's state_dict with the config that built it;
* ``checkpoint.pt``    - while training: everything needed to resume after the last finished epoch;
* ``predictions.npz``  - test-set predictions of the final model (index, target, pred);
* ``model_summary.txt``- the per-layer summary and parameter count.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normsweep.base.errors import NormsweepError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
MODEL_FILE = "model.pt"
TRAINING_STATE_FILE = "checkpoint.pt"  # resume state, rewritten every epoch, removed when the run completes
PREDICTIONS_FILE = "predictions.npz"
SUMMARY_FILE = "model_summary.txt"


TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: ".<name>.<random>.tmp" beside <name>


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


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permissions ``path`` gets: its own if it exists, else what ``open()`` would give a new file (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync it, rename it onto ``path``, fsync the directory.

    Readers see the old file or the new one, complete, and after a power cut the new one is not
    empty. The file gets the permissions a plain ``open()`` would give it (an existing file keeps
    its own), not the temporary file's 0600. If anything fails (disk full, read-only directory), the temporary file is removed, the
    previous ``path`` is left as it was, and an OSError is raised as :class:`WriteError`, naming
    the file and what to do.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        try:
            os.fchmod(fd, _mode_for(path))  # mkstemp's 0600 would hide every result from the user's group
        finally:
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


def remove_stray_temp_files(directory: str | Path, name: str = "*", recursive: bool = False) -> None:
    """Delete the temporary files that :func:`atomic_write` left for ``name`` when its process was killed.

    Call it only while holding the lock that makes this process the one writer of those files
    (``job.hold_run_dir`` for a run, the cache's lock, the report's): every such file is then
    stale, and the file it was to replace is intact, since a rename is atomic.
    """
    directory = Path(directory)
    pattern = f".{name}.*{TEMP_SUFFIX}"
    for tmp in sorted(directory.rglob(pattern) if recursive else directory.glob(pattern)):
        log.info("removing %s, left by an interrupted write", tmp)
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@dataclass
class EpochRecord:
    """One finished epoch: an entry of ``results.json``'s history and of the checkpoint's (``train.EpochStats``)."""

    epoch: int
    train_loss: float
    train_acc: float  # %
    val_acc: float  # %
    test_acc: float  # %
    lr: float  # at the end of the epoch
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EpochRecord:
        """An entry as any version wrote it: a missing number is None, an unknown key is dropped."""
        if not isinstance(d, dict):
            raise ValueError(f"a history entry is a {type(d).__name__}, not an object")
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


def _late(default: Any = None) -> Any:
    """A field that is set once known, and written only then (absent from the file while None)."""
    return field(default=default, metadata={"late": True})


@dataclass
class RunRecord:
    """A run's ``results.json``: built and updated by the job, written by :meth:`write`, read by :meth:`read`.

    The fields are the file's keys, in the file's order. Reading migrates: a key the file lacks (an
    older record) takes the field's default, a null where a list or dict belongs becomes an empty
    one; a key this class does not know (a newer record) is kept in ``extra`` and written back after
    the known ones. :meth:`to_dict` is the file's object, for code that wants a dict.
    """

    status: str = "unknown"  # running | completed | failed | interrupted | pruned
    error: str | None = None  # "Type: message" of what stopped the run
    norm: str | None = None
    arch: str | None = None
    choices: dict = field(default_factory=dict)  # the option picked in each config group
    params: int | None = None
    epochs: int | None = None  # configured
    epochs_completed: int = 0
    best_val_acc: float | None = None
    best_epoch: int | None = None
    final_val_acc: float | None = None
    final_test_acc: float | None = None
    final_val_acc_tta: float | None = None  # with flip test-time augmentation; None when it was off
    final_test_acc_tta: float | None = None
    final_train_loss: float | None = None
    train_seconds: float = 0.0
    seconds_per_epoch: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None
    overrides: list = field(default_factory=list)  # the job's Hydra overrides
    trial: int | None = None  # the search trial's number
    config: dict = field(default_factory=dict)  # the resolved config
    started_at: str | None = None
    host: str | None = None
    pid: int | None = None
    platform: str | None = None
    torch: str | None = None  # torch's version
    history: list[EpochRecord] = field(default_factory=list)
    bf16: bool | None = _late()
    data_root: str | None = _late()  # data.root, absolute
    dataset: str | None = _late()  # data.source: cifar10 | cifar100 | svhn | folder (an older file: absent, None)
    num_classes: int | None = _late()
    image_size: int | None = _late()  # pixels of the square images the model saw
    classes: list[str] | None = _late()
    finished_at: str | None = _late()
    traceback: str | None = _late()  # of a failed run
    extra: dict = field(default_factory=dict, repr=False, metadata={"key": False})  # keys of a newer version

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("key", True) or (value is None and f.metadata.get("late")):
                continue
            out[f.name] = [e.as_dict() for e in value] if f.name == "history" else value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        """The record of a ``results.json`` object of any version (see the class docstring)."""
        if not isinstance(d, dict):
            raise ValueError(f"a run record is a JSON object, not a {type(d).__name__}")
        known = {f.name: f for f in fields(cls) if f.metadata.get("key", True)}
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name not in d:
                continue
            value = d[name]
            if value is None and f.default_factory is not MISSING:
                value = f.default_factory()
            if name == "history":
                if not isinstance(value, list):
                    raise ValueError(f"its history is a {type(value).__name__}, not a list")
                value = [EpochRecord.from_dict(e) for e in value]
            values[name] = value
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})

    def write(self, job_dir: str | Path) -> None:
        """``job_dir/results.json``, atomically: readers see the previous record or this one."""
        write_json(Path(job_dir) / RESULTS_FILE, self.to_dict())

    @classmethod
    def read(cls, job_dir: str | Path) -> RunRecord:
        """The record in ``job_dir/results.json``; OSError if it cannot be read, ValueError if it is not a record."""
        return cls.from_dict(json.loads((Path(job_dir) / RESULTS_FILE).read_text()))


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
