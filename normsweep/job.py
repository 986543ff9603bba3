"""One Hydra job: validated config -> data -> model (within budget) -> training -> outputs.

Runs in the job directory Hydra made (``hydra.job.chdir=true``); returns the final validation
accuracy so that a sweeper can optimize it.
"""

from __future__ import annotations

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

from . import results, search
from .config import Config, ConfigError, NormsweepError, to_config
from .data import load_raw, make_splits
from .models import build_model, count_params
from .train import (
    CheckpointError,
    EpochStats,
    keep_freed_memory,
    predict,
    prepare_eval,
    resolve_device,
    train,
    use_bf16,
)

log = logging.getLogger(__name__)


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


def model_from_config(cfg: Config, num_classes: int = 10) -> torch.nn.Module:
    return build_model(
        cfg.model.arch.value,
        cfg.norm.kind.value,
        cfg.norm.groups,
        cfg.model.dropout,
        cfg.model.widths,
        cfg.model.depths,
        num_classes,
    )


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


# Keys that may change between an interrupted run and its resumption without changing its results.
RESUME_IGNORED = ("trainer.progress", "trainer.threads", "trainer.compile", "trainer.reuse_memory", "data.cache_dir", "data.root", "data.download", "budget.")


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
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith(RESUME_IGNORED))


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


def run(dcfg: DictConfig, out_dir: str | Path = ".") -> float:
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
        "final_train_loss": None,
        "train_seconds": 0.0,
        "seconds_per_epoch": None,
        "peak_memory_mb": None,
        "device": None,
        "overrides": _overrides(),
        "trial": search.ACTIVE_TRIAL.number if search.ACTIVE_TRIAL else None,
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
    try:
        return _run(to_config(dcfg), out, record)
    except BaseException as e:  # record why, then let Hydra report it
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if isinstance(e, search.TrialPruned):  # the search stopped this trial early
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
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def _run(cfg: Config, out: Path, record: dict) -> float:
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
        search.report_epoch(stats.epoch, stats.val_acc)  # may raise optuna.TrialPruned

    t0 = time.perf_counter()
    state_file = out / results.TRAINING_STATE_FILE
    train(model, cfg, splits, device, on_epoch, checkpoint=state_file, config_record=record["config"])
    log.info("trained in %.1fs", time.perf_counter() - t0)

    test_x, test_y = prepare_eval(splits.test, device)
    preds = predict(model, test_x, channels_last=cfg.trainer.channels_last, bf16=bf16)
    results.save_predictions(out / results.PREDICTIONS_FILE, splits.test.index, test_y, preds)
    results.save_model(out / results.MODEL_FILE, model, record["config"], splits.classes)
    record["status"] = "completed"
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results.write_json(out / results.RESULTS_FILE, record)
    state_file.unlink(missing_ok=True)  # results.json now says completed; the resume state is spent
    log.info(
        "done: %s norm, %s params, final test %.2f%%, best val %.2f%% (epoch %d), %.1fs/epoch -> %s",
        record["norm"], f"{params:,}", record["final_test_acc"], record["best_val_acc"], record["best_epoch"],
        record["seconds_per_epoch"], out.resolve(),
    )  # fmt: skip
    return float(record["final_val_acc"])
