"""One Hydra job: validated config -> data -> model (within budget) -> training -> outputs.

Runs in the job directory Hydra made (``hydra.job.chdir=true``); returns the final validation
accuracy so that a sweeper can optimize it. The layers of a run, each a function that adds one thing:

1. :func:`run`: refuses a secret in the config, then holds the directory (a second process on it stops);
2. :func:`_run_in_held_dir`: skips a run already completed there, else writes the "running" record;
3. :func:`_run_recording_the_end`: whatever ends the run (an error, the pruner, Ctrl-C, SIGTERM) goes
   into results.json and the tracker (:func:`_record_the_stop`);
4. :func:`_train_and_save`: the run itself, in named steps: the machine (:func:`_use_machine`), the data
   (:func:`_load_data`), the model within the budget (:func:`_build_model`), training with each epoch
   recorded (:class:`EpochRecorder`), the final evaluation and the files (:func:`_save_outputs`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torchinfo import summary

from normsweep.base import credentials, results
from normsweep.base.results import RunRecord
from normsweep.base.runtime import job_threads, keep_freed_memory, peak_memory_mb, resolve_device, use_bf16
from normsweep.base.signals import sigterm_interrupts, stop_reason, stopping_uninterrupted
from normsweep.config import Config, ConfigError, DataConfig, NormsweepError, to_config
from normsweep.data import DataInfo, Splits, load_raw, make_splits
from normsweep.models import count_params
from normsweep.run import recipes, trackers, trial_hook
from normsweep.run.build import budget_params, check_budget, model_from_config
from normsweep.run.resume import CheckpointError, load_checkpoint, previous_result, resume_hint
from normsweep.run.train import EpochStats, accuracy, predict, prepare_eval, train

log = logging.getLogger(__name__)


def model_summary(model: torch.nn.Module, image_size: int = 32) -> str:
    size = (1, 3, image_size, image_size)  # the data's: Inception v3 refuses 32x32, MaxViT takes its input_size only
    stats = summary(model, input_size=size, col_names=("output_size", "num_params"), verbose=0, device="cpu")
    return str(stats)


def _overrides() -> list[str]:
    """The command line's overrides as typed: an interpolation in one (``${oc.env:VAR}``) stays unresolved."""
    return OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False) if HydraConfig.initialized() else []


def _choices() -> dict:
    """The option picked in each config group (norm, augment, optimizer, ...)."""
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}


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
            since = utc_now()
            holder = f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n"
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, holder.encode())
            results.remove_stray_temp_files(out)  # only the holder writes here: they are stale
        yield
    finally:
        os.close(fd)  # releases the lock


def run(dcfg: DictConfig, out_dir: str | Path = ".") -> float:
    """Train one model as ``dcfg`` says, write its outputs to ``out_dir``; return final val accuracy.

    Holds ``out_dir`` for the whole run (:func:`hold_run_dir`): a second process on the same
    directory stops at once, naming this one. A password written into the config stops it before
    anything is written (:mod:`normsweep.base.credentials`).
    """
    credentials.refuse_inline_passwords(dcfg)
    with hold_run_dir(Path(out_dir)):
        return _run_in_held_dir(dcfg, out_dir)


def _run_in_held_dir(dcfg: DictConfig, out_dir: str | Path = ".") -> float:
    """Train one model as ``dcfg`` says, write its outputs to ``out_dir``; return final val accuracy.

    A directory that already holds this run completed is left as it is (its final validation
    accuracy is returned); one that holds a checkpoint resumes from it.
    """
    out = Path(out_dir)
    config = credentials.recorded_config(dcfg)  # resolved, but a password's interpolation as written
    try:
        previous = previous_result(out, config)
    except NormsweepError as e:  # before the record: nothing else says why the run did not start
        log.error("%s", e)
        raise
    if previous is not None:
        log.info("%s already holds this run, completed: skipping it (delete it to run again)", out.resolve())
        return float(previous.final_val_acc)
    choices, overrides = _choices(), _overrides()
    recipes.warn_recipe_conflicts(dcfg, overrides, choices)
    record = RunRecord(
        status="running",
        norm=dcfg.norm.kind.value,
        arch=dcfg.model.arch.value,
        choices=choices,
        epochs=dcfg.trainer.epochs,
        overrides=overrides,
        trial=trial_hook.ACTIVE.number if trial_hook.ACTIVE else None,
        config=config,
        started_at=utc_now(),
        host=socket.gethostname(),
        pid=os.getpid(),
        platform=platform.platform(),
        torch=torch.__version__,
    )
    record.write(out)  # "running": the report can tell a live run
    with sigterm_interrupts():
        return _run_recording_the_end(dcfg, out, record, config)


def _epochs_saved(out: Path, recorded: int | None) -> int:
    """The epochs a resume starts after: the checkpoint's, which a signal landing between the save of an
    epoch's checkpoint and the record's update leaves one ahead of ``recorded``."""
    state, recorded = out / results.TRAINING_STATE_FILE, recorded or 0
    try:
        return max(recorded, load_checkpoint(state)["epoch"]) if state.exists() else recorded
    except CheckpointError:
        return recorded


def _run_recording_the_end(dcfg: DictConfig, out: Path, record: RunRecord, config: dict) -> float:
    """Run the job; whatever ends it (an error, the search's pruner, Ctrl-C or SIGTERM) goes into ``record``."""
    tracker = trackers.Tracker()  # logger=none until the configured tracker has started
    try:
        cfg = to_config(dcfg)
        tracker = trackers.make_tracker(cfg.logger, out)
        tracker.start(config, record.to_dict())  # logger=tensorboard|mlflow: a missing package stops the run here
        return _train_and_save(cfg, out, record, tracker)
    except BaseException as e:  # record why, then let Hydra report it
        with stopping_uninterrupted():  # a second signal (a requeue's SIGTERM) must not cut the record short
            _record_the_stop(e, out, record, tracker)
        raise


def _record_the_stop(e: BaseException, out: Path, record: RunRecord, tracker: trackers.Tracker) -> None:
    """Why the run ended early, into ``record`` (results.json) and the tracker.

    Interrupted: Ctrl-C, SIGTERM, and ``SystemExit`` raised inside the run (submitit's handler of a
    time limit or a preemption exits so, after requeueing the job): the checkpoint stays and the
    same command resumes. Pruned: the search stopped the trial. Anything else: failed.
    """
    record.finished_at = utc_now()
    if isinstance(e, trial_hook.RunPruned):  # the search stopped this trial early
        record.status = "pruned"
        record.error = f"TrialPruned: {e}"
        log.info("run pruned by the search: %s", e)
    elif isinstance(e, (KeyboardInterrupt, SystemExit)):
        record.status = "interrupted"
        done = _epochs_saved(out, record.epochs_completed)
        record.error = f"{stop_reason(e)} after epoch {done}; {resume_hint(out)}"
        log.error("run interrupted after epoch %d of %d; %s", done, record.epochs, resume_hint(out))
    else:
        record.status = "failed"
        record.error = credentials.redact(f"{type(e).__name__}: {e}")  # a client's error may quote its URL
        record.traceback = credentials.redact(traceback.format_exc())
        log.error("run failed: %s", e if isinstance(e, NormsweepError) else record.error)
    record.write(out)
    tracker.close(record.to_dict(), trackers.run_files(out))


def utc_now() -> str:
    """The time a record states (``started_at``, ``finished_at``): UTC, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _use_machine(cfg: Config, record: RunRecord) -> tuple[torch.device, bool]:
    """The device and bf16 setting the run uses (recorded), with the torch threads and malloc set for it."""
    threads = job_threads(cfg.trainer.threads, jobs_at_once=cfg.search.workers if cfg.search else None)
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(cfg.trainer.device)
    if device.type == "cpu" and cfg.trainer.reuse_memory:
        keep_freed_memory()  # no page faults for every large activation (runtime.keep_freed_memory)
    record.device = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    record.bf16 = use_bf16(cfg.trainer.bf16, device)
    return device, record.bf16


def load_splits(d: DataConfig, root: str) -> Splits:
    """The training, validation and test splits ``data.*`` asks for, read from ``root`` (``data.root``, absolute)."""
    raw = load_raw(
        root, d.format.value, d.download, d.cache_dir and to_absolute_path(d.cache_dir),
        source=d.source.value, labels=d.labels, extra=d.extra, image_size=d.image_size, max_memory_gb=d.max_memory_gb,
    )  # fmt: skip
    return make_splits(raw, d.val_size, d.train_size, d.test_size, d.split_seed)  # the raw set is freed on return


def _load_data(cfg: Config, record: RunRecord) -> Splits:
    """The splits ``data.*`` asks for; the data's facts (name, class count, image size, classes) recorded."""
    d = cfg.data
    record.data_root = to_absolute_path(d.root)
    splits = load_splits(d, record.data_root)
    info = splits.info  # the data's facts: the model's head and input size, the normalization, results.json
    record.dataset, record.num_classes, record.image_size = info.name, info.num_classes, info.image_size
    record.classes = list(splits.classes)
    if cfg.trainer.batch_size > len(splits.train):
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the {len(splits.train)} training images "
            f"(data.train_size={d.train_size}, data.val_size={d.val_size}); lower trainer.batch_size or use more data"
        )
    return splits


def _build_model(cfg: Config, info: DataInfo, out: Path, record: RunRecord) -> torch.nn.Module:
    """The model, seeded with ``trainer.seed``, its summary written and its size recorded; over the budget stops."""
    torch.manual_seed(cfg.trainer.seed)
    model = model_from_config(cfg, info.num_classes, info.image_size)
    params = record.params = count_params(model)
    text = model_summary(model, info.image_size)
    results.write_text(out / results.SUMMARY_FILE, text + "\n")
    which = " ".join(v for v in (cfg.model.arch.value, cfg.model.name, cfg.model.target) if v)  # torchvision resnet18
    log.info("model %s with %s norm: %s parameters\n%s", which, cfg.norm.kind.value, f"{params:,}", text)
    counted = budget_params(cfg, params, info.num_classes, info.image_size)
    if counted != params:
        log.info("budget: %s parameters counted, the network with a 10-class head (the study's budget is set for "
                 "CIFAR-10's 10 classes; budget=none turns it off)", f"{counted:,}")  # fmt: skip
    check_budget(cfg, counted, info.num_classes)
    return model


class EpochRecorder:
    """What happens after each epoch (``train``'s ``on_epoch``): results.json and the tracker updated, and each
    epoch not reported yet (a resumed run's earlier ones first) reported to the search, whose pruner may stop
    the run (``trial_hook.RunPruned``)."""

    def __init__(self, cfg: Config, out: Path, record: RunRecord, tracker: trackers.Tracker, device: torch.device):
        self.epochs, self.out, self.record, self.tracker, self.device = cfg.trainer.epochs, out, record, tracker, device
        self.reported: set[int] = set()

    def record_progress(self, history: list[EpochStats]) -> None:
        record, stats = self.record, history[-1]
        best = max(history, key=lambda e: e.val_acc)
        record.history = list(history)
        record.epochs_completed = stats.epoch
        record.best_val_acc, record.best_epoch = best.val_acc, best.epoch
        record.final_val_acc, record.final_test_acc = stats.val_acc, stats.test_acc
        record.final_train_loss = stats.train_loss
        record.train_seconds = sum(e.seconds for e in history)
        record.seconds_per_epoch = record.train_seconds / len(history)
        record.peak_memory_mb = peak_memory_mb(self.device)
        record.write(self.out)
        self.tracker.log_history(history)  # the epochs the tracker does not hold yet (a resumed run's too)

    def __call__(self, history: list[EpochStats]) -> None:
        self.record_progress(history)
        for stats in history:
            if stats.epoch not in self.reported:
                self.reported.add(stats.epoch)
                last = stats.epoch >= self.epochs  # the run is done: its result is not to be pruned
                trial_hook.report_epoch(stats.epoch, stats.val_acc, last)  # may raise RunPruned


def _save_outputs(cfg: Config, model: torch.nn.Module, splits: Splits, device: torch.device, bf16: bool, out: Path,
                  record: RunRecord) -> None:  # fmt: skip
    """The trained model's final evaluation (with flip TTA where on), its predictions and the model file."""
    test_x, test_y = prepare_eval(splits.test, device, splits.info)
    preds = predict(model, test_x, channels_last=cfg.trainer.channels_last, bf16=bf16)
    if cfg.trainer.tta_flip:  # the final model's accuracy with flip test-time augmentation
        val_x, val_y = prepare_eval(splits.val, device, splits.info)
        tta = dict(channels_last=cfg.trainer.channels_last, bf16=bf16, tta_flip=True)
        record.final_val_acc_tta = accuracy(predict(model, val_x, **tta), val_y)
        record.final_test_acc_tta = accuracy(predict(model, test_x, **tta), test_y)
    results.save_predictions(out / results.PREDICTIONS_FILE, splits.test.index, test_y, preds)
    results.save_model(out / results.MODEL_FILE, model, record.config, splits.classes)


def _train_and_save(cfg: Config, out: Path, record: RunRecord, tracker: trackers.Tracker | None = None) -> float:
    """The run: machine, data, model, training (resumed from the directory's checkpoint), outputs; returns the
    final validation accuracy."""
    tracker = tracker or trackers.Tracker()
    device, bf16 = _use_machine(cfg, record)
    splits = _load_data(cfg, record)
    info = splits.info
    model = _build_model(cfg, info, out, record)
    log.info(
        "data: %s, %d classes, %dx%d: %d train, %d val, %d test images from %s; device %s, %s",
        info.name, info.num_classes, info.image_size, info.image_size, len(splits.train), len(splits.val),
        len(splits.test), cfg.data.root, record.device, "bf16 autocast" if bf16 else "fp32",
    )  # fmt: skip

    t0 = time.perf_counter()
    state_file = out / results.TRAINING_STATE_FILE
    recorder = EpochRecorder(cfg, out, record, tracker, device)
    history = train(model, cfg, splits, device, recorder, checkpoint=state_file, config_record=record.config)
    if history and record.epochs_completed != history[-1].epoch:
        # killed after the last epoch's checkpoint, before results.json said completed: no epoch was
        # left to train, so the record takes the history from the checkpoint
        recorder.record_progress(history)
    log.info("trained in %.1fs", time.perf_counter() - t0)

    _save_outputs(cfg, model, splits, device, bf16, out, record)
    record.status = "completed"
    record.finished_at = utc_now()
    record.write(out)
    state_file.unlink(missing_ok=True)  # results.json now says completed; the resume state is spent
    tracker.close(record.to_dict(), trackers.run_files(out))
    log.info(
        "done: %s norm, %s params, final test %.2f%% (flip TTA %s), best val %.2f%% (epoch %d), %.1fs/epoch -> %s",
        record.norm, f"{record.params:,}", record.final_test_acc,
        "off" if record.final_test_acc_tta is None else f"{record.final_test_acc_tta:.2f}%", record.best_val_acc, record.best_epoch,
        record.seconds_per_epoch, out.resolve(),
    )  # fmt: skip
    return float(record.final_val_acc)
