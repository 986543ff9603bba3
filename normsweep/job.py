"""One Hydra job: validated config -> data -> model (within budget) -> training -> outputs.

Runs in the job directory Hydra made (``hydra.job.chdir=true``); returns the final validation
accuracy so that a sweeper can optimize it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import signal
import socket
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torchinfo import summary

from . import results, trackers, trial_hook
from .config import Config, ConfigError, NormsweepError, is_result_neutral, to_config
from .data import load_raw, make_splits
from .models import BudgetError, check_budget, count_params, model_from_config  # noqa: F401 - BudgetError re-exported
from .train import (
    CheckpointError,
    EpochStats,
    accuracy,
    keep_freed_memory,
    predict,
    prepare_eval,
    resolve_device,
    train,
    use_bf16,
)

log = logging.getLogger(__name__)


def model_summary(model: torch.nn.Module) -> str:
    stats = summary(
        model, input_size=(1, 3, 32, 32), col_names=("output_size", "num_params"), verbose=0, device="cpu"
    )
    return str(stats)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run so far: max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _choices() -> dict:
    """The option picked in each config group (norm, augment, optimizer, ...)."""
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}


def job_threads(threads: int | None) -> int | None:
    """Torch threads for this job: ``trainer.threads``, or the job's share of the cores.

    With ``trainer.threads=null`` a job under a parallel launcher gets ``cpus_per_task`` threads
    (submitit) or ``cores // n_jobs`` (joblib; ``n_jobs=-1`` is one job per core), so parallel
    jobs do not oversubscribe the cores; otherwise torch keeps its default (all cores).
    """
    if threads or not HydraConfig.initialized():
        return threads
    launcher = HydraConfig.get().launcher
    if launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    n_jobs = launcher.get("n_jobs")
    if n_jobs:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but one
        return max(1, cores // parallel)
    return None


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C — stop, keep the last epoch's checkpoint, say how to resume."""




def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two run configs, ignoring those that do not affect results."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not is_result_neutral(k))


def _previous_result(out: Path, config: dict) -> dict | None:
    """The completed result in ``out`` for this same config, if any; refuses a different config."""
    path = out / results.RESULTS_FILE
    if not path.exists():
        return None
    try:
        previous = results.read_results(out)
    except ValueError:
        return None  # unreadable: treat the run as not done; it will be rewritten
    diff = config_differences(previous.get("config") or {}, config)
    if diff and (previous.get("status") == "completed" or (out / results.TRAINING_STATE_FILE).exists()):
        raise CheckpointError(
            f"{out.resolve()} already holds a run with another config (differs in {', '.join(diff)}); "
            f"pass another hydra.run.dir / hydra.sweep.dir, or delete that directory"
        )
    return previous if previous.get("status") == "completed" else None


def _resume_hint(out: Path) -> str:
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"run the same command with hydra.sweep.dir={HydraConfig.get().sweep.dir} to resume"
    return f"run the same command with hydra.run.dir={out.resolve()} to resume"


RUN_LOCK_FILE = ".normsweep.lock"  # in the job directory; names the process that holds it


class RunDirInUse(NormsweepError, RuntimeError):
    """Another live process is writing this run directory."""


def _lock(fd: int) -> None:
    """An exclusive, non-blocking OS lock on ``fd``, released by the OS when the process ends."""
    try:
        import fcntl
    except ImportError:  # Windows: lock one byte past the holder's line, so that it stays readable
        import msvcrt

        os.lseek(fd, 4096, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _lock_holder(fd: int) -> str:
    """The line the holder wrote ("pid N on host H since T"); it may be a moment from being written."""
    for _ in range(40):
        text = os.pread(fd, 4096, 0).decode(errors="replace") if hasattr(os, "pread") else ""
        if text.endswith("\n"):
            return text.strip()
        time.sleep(0.05)
    return "a process that has not written its name"


@contextlib.contextmanager
def hold_run_dir(out: Path):
    """One writer per run directory: hold an exclusive lock on ``out`` for as long as the block runs.

    The lock is an OS file lock (``flock``) on ``out/.normsweep.lock``, whose text names the holder
    (pid, host, start). The OS drops it when the holder ends, however it ends (``kill -9`` too), so
    the file left by a killed process never blocks a resume. A second process stops at once with
    :class:`RunDirInUse`, naming the holder, before it writes anything of the run.
    """
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _lock(fd)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", -1)):
                log.warning("cannot lock %s (%s): make sure no other process writes this run", out.resolve(), e)
            else:
                msg = (
                    f"{out.resolve()} is being written by another normsweep run: {_lock_holder(fd)}. Two processes "
                    f"must not write one run: wait for that one to finish (or, if it hangs, stop it and run the same "
                    f"command again to resume), or pass another hydra.run.dir (hydra.sweep.dir for a sweep)"
                )
                log.error("%s", msg)
                raise RunDirInUse(msg) from None
        else:
            since = datetime.now(timezone.utc).isoformat(timespec="seconds")
            holder = f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n"
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, holder.encode())
            _remove_stray_temp_files(out)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stray_temp_files(out: Path) -> None:
    """Delete the temporary files of writes a killed process left half-done (``results.atomic_write``).

    Only the lock holder writes in ``out``, so every such file there is stale; the renamed files
    they were to replace are intact (a rename is atomic).
    """
    for tmp in out.glob(".*.tmp"):
        log.info("removing %s, left by an interrupted write", tmp.name)
        tmp.unlink(missing_ok=True)


def run(dcfg: DictConfig, out_dir: str | Path = ".") -> float:
    """Train one model as ``dcfg`` says, write its outputs to ``out_dir``; return final val accuracy.

    Holds ``out_dir`` for the whole run (:func:`hold_run_dir`): a second process on the same
    directory stops at once, naming this one.
    """
    with hold_run_dir(Path(out_dir)):
        return _run_held(dcfg, out_dir)


def _run_held(dcfg: DictConfig, out_dir: str | Path = ".") -> float:
    """Train one model as ``dcfg`` says, write its outputs to ``out_dir``; return final val accuracy.

    A directory that already holds this run completed is left as it is (its final validation
    accuracy is returned); one that holds a checkpoint resumes from it.
    """
    out = Path(out_dir)
    config = OmegaConf.to_container(dcfg, resolve=True, enum_to_str=True)
    previous = _previous_result(out, config)
    if previous is not None:
        log.info("%s already holds this run, completed: skipping it (delete it to run again)", out.resolve())
        return float(previous["final_val_acc"])
    record: dict = {
        "status": "running",
        "error": None,
        "norm": dcfg.norm.kind.value,
        "arch": dcfg.model.arch.value,
        "choices": _choices(),
        "params": None,
        "epochs": dcfg.trainer.epochs,
        "epochs_completed": 0,
        "best_val_acc": None,
        "best_epoch": None,
        "final_val_acc": None,
        "final_test_acc": None,
        "final_val_acc_tta": None,
        "final_test_acc_tta": None,
        "final_train_loss": None,
        "train_seconds": 0.0,
        "seconds_per_epoch": None,
        "peak_memory_mb": None,
        "device": None,
        "overrides": _overrides(),
        "trial": trial_hook.ACTIVE.number if trial_hook.ACTIVE else None,
        "config": config,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "history": [],
    }
    results.write_json(out / results.RESULTS_FILE, record)  # "running": the report can tell a live run

    def on_sigterm(signum, frame):
        raise RunInterrupted(f"stopped by signal {signal.Signals(signum).name}")

    # Signal handlers can only be set from the main thread (not so under a thread-based launcher).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    tracker = trackers.Tracker()  # logger=none until the configured tracker has started
    try:
        cfg = to_config(dcfg)
        tracker = trackers.make_tracker(cfg.logger, out)
        tracker.start(config, record)  # logger=tensorboard|mlflow: a missing package stops the run here
        return _run(cfg, out, record, tracker)
    except BaseException as e:  # record why, then let Hydra report it
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if isinstance(e, trial_hook.RunPruned):  # the search stopped this trial early
            record["status"] = "pruned"
            record["error"] = f"TrialPruned: {e}"
            log.info("run pruned by the search: %s", e)
        elif isinstance(e, KeyboardInterrupt):
            record["status"] = "interrupted"
            done = record["epochs_completed"]
            record["error"] = f"{type(e).__name__}: {e or 'Ctrl-C'} after epoch {done}; {_resume_hint(out)}"
            log.error("run interrupted after epoch %d of %d; %s", done, record["epochs"], _resume_hint(out))
        else:
            record["status"] = "failed"
            record["error"] = f"{type(e).__name__}: {e}"
            record["traceback"] = traceback.format_exc()
            log.error("run failed: %s", e if isinstance(e, NormsweepError) else record["error"])
        results.write_json(out / results.RESULTS_FILE, record)
        tracker.close(record, trackers.run_files(out))
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def _run(cfg: Config, out: Path, record: dict, tracker: trackers.Tracker | None = None) -> float:
    tracker = tracker or trackers.Tracker()
    threads = job_threads(cfg.trainer.threads)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.trainer.seed)
    model = model_from_config(cfg)
    params = count_params(model)
    record["params"] = params
    text = model_summary(model)
    results.write_text(out / results.SUMMARY_FILE, text + "\n")
    log.info("model %s with %s norm: %s parameters\n%s", cfg.model.arch.value, cfg.norm.kind.value, f"{params:,}", text)
    check_budget(cfg, params)

    device = resolve_device(cfg.trainer.device)
    if device.type == "cpu" and cfg.trainer.reuse_memory:
        keep_freed_memory()  # no page faults for every large activation (train.keep_freed_memory)
    record["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    record["bf16"] = bf16 = use_bf16(cfg.trainer.bf16, device)
    d = cfg.data
    record["data_root"] = to_absolute_path(d.root)
    raw = load_raw(record["data_root"], d.format.value, d.download, d.cache_dir and to_absolute_path(d.cache_dir))
    splits = make_splits(raw, d.val_size, d.train_size, d.test_size, d.split_seed)
    record["classes"] = list(splits.classes)
    del raw  # the splits hold copies; free the full set
    if cfg.trainer.batch_size > len(splits.train):
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the {len(splits.train)} training images "
            f"(data.train_size={d.train_size}, data.val_size={d.val_size}); lower trainer.batch_size or use more data"
        )
    log.info(
        "data: %d train, %d val, %d test images from %s; device %s, %s",
        len(splits.train), len(splits.val), len(splits.test), d.root, record["device"], "bf16 autocast" if bf16 else "fp32",
    )  # fmt: skip

    def on_epoch(history: list[EpochStats]) -> None:
        stats = history[-1]
        h = record["history"] = [e.as_dict() for e in history]
        best = max(h, key=lambda e: e["val_acc"])
        record.update(
            epochs_completed=stats.epoch,
            best_val_acc=best["val_acc"],
            best_epoch=best["epoch"],
            final_val_acc=stats.val_acc,
            final_test_acc=stats.test_acc,
            final_train_loss=stats.train_loss,
            train_seconds=sum(e["seconds"] for e in h),
            seconds_per_epoch=sum(e["seconds"] for e in h) / len(h),
            peak_memory_mb=peak_memory_mb(device),
        )
        results.write_json(out / results.RESULTS_FILE, record)
        tracker.log_history(history)  # the epochs the tracker does not hold yet (a resumed run's too)
        trial_hook.report_epoch(stats.epoch, stats.val_acc)  # may raise RunPruned

    t0 = time.perf_counter()
    state_file = out / results.TRAINING_STATE_FILE
    train(model, cfg, splits, device, on_epoch, checkpoint=state_file, config_record=record["config"])
    log.info("trained in %.1fs", time.perf_counter() - t0)

    test_x, test_y = prepare_eval(splits.test, device)
    preds = predict(model, test_x, channels_last=cfg.trainer.channels_last, bf16=bf16)
    if cfg.trainer.tta_flip:  # the final model's accuracy with flip test-time augmentation
        val_x, val_y = prepare_eval(splits.val, device)
        tta = dict(channels_last=cfg.trainer.channels_last, bf16=bf16, tta_flip=True)
        record["final_val_acc_tta"] = accuracy(predict(model, val_x, **tta), val_y)
        record["final_test_acc_tta"] = accuracy(predict(model, test_x, **tta), test_y)
    results.save_predictions(out / results.PREDICTIONS_FILE, splits.test.index, test_y, preds)
    results.save_model(out / results.MODEL_FILE, model, record["config"], splits.classes)
    record["status"] = "completed"
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results.write_json(out / results.RESULTS_FILE, record)
    state_file.unlink(missing_ok=True)  # results.json now says completed; the resume state is spent
    tracker.close(record, trackers.run_files(out))
    log.info(
        "done: %s norm, %s params, final test %.2f%% (flip TTA %s), best val %.2f%% (epoch %d), %.1fs/epoch -> %s",
        record["norm"], f"{params:,}", record["final_test_acc"],
        "off" if record["final_test_acc_tta"] is None else f"{record['final_test_acc_tta']:.2f}%", record["best_val_acc"], record["best_epoch"],
        record["seconds_per_epoch"], out.resolve(),
    )  # fmt: skip
    return float(record["final_val_acc"])
