"""One Hydra job: validated config -> data -> model (within budget) -> training -> outputs.

Runs in the job directory Hydra made (``hydra.job.chdir=true``); returns the final validation
accuracy so that a sweeper can optimize it.
"""

from __future__ import annotations

import logging
import platform
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchinfo import summary

from . import results
from .config import Config, NormsweepError, to_config
from .data import load_raw, make_splits
from .models import build_model, count_params
from .train import EpochStats, predict, prepare_eval, resolve_device, train

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


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _choices() -> dict:
    """The option picked in each config group (norm, augment, optimizer, ...)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}


def run(dcfg: DictConfig, out_dir: str | Path = ".") -> float:
    """Train one model as ``dcfg`` says, write its outputs to ``out_dir``; return final val accuracy."""
    out = Path(out_dir)
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
        "device": None,
        "overrides": _overrides(),
        "config": OmegaConf.to_container(dcfg, resolve=True, enum_to_str=True),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "history": [],
    }
    try:
        return _run(to_config(dcfg), out, record)
    except BaseException as e:  # record why, then let Hydra report it
        record["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        results.write_json(out / results.RESULTS_FILE, record)
        log.error("run %s: %s", record["status"], e if isinstance(e, NormsweepError) else record["error"])
        raise


def _run(cfg: Config, out: Path, record: dict) -> float:
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)
    model = model_from_config(cfg)
    params = count_params(model)
    record["params"] = params
    text = model_summary(model)
    results.write_text(out / results.SUMMARY_FILE, text + "\n")
    log.info("model %s with %s norm: %s parameters\n%s", cfg.model.arch.value, cfg.norm.kind.value, f"{params:,}", text)
    check_budget(cfg, params)

    device = resolve_device(cfg.trainer.device)
    record["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    from hydra.utils import to_absolute_path

    d = cfg.data
    record["data_root"] = to_absolute_path(d.root)
    raw = load_raw(record["data_root"], d.format.value, d.download, d.cache_dir and to_absolute_path(d.cache_dir))
    splits = make_splits(raw, d.val_size, d.train_size, d.test_size, d.split_seed)
    record["classes"] = list(splits.classes)
    del raw  # the splits hold copies; free the full set
    log.info(
        "data: %d train, %d val, %d test images from %s; device %s",
        len(splits.train), len(splits.val), len(splits.test), d.root, record["device"],
    )  # fmt: skip

    def on_epoch(stats: EpochStats) -> None:
        h = record["history"]
        h.append(stats.as_dict())
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
        )
        results.write_json(out / results.RESULTS_FILE, record)

    t0 = time.perf_counter()
    train(model, cfg, splits, device, on_epoch)
    log.info("trained in %.1fs", time.perf_counter() - t0)

    test_x, test_y = prepare_eval(splits.test, device)
    preds = predict(model, test_x, channels_last=cfg.trainer.channels_last, bf16=cfg.trainer.bf16)
    results.save_predictions(out / results.PREDICTIONS_FILE, splits.test.index, test_y, preds)
    results.save_checkpoint(out / results.CHECKPOINT_FILE, model, record["config"], splits.classes)
    record["status"] = "completed"
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results.write_json(out / results.RESULTS_FILE, record)
    log.info(
        "done: %s norm, %s params, final test %.2f%%, best val %.2f%% (epoch %d), %.1fs/epoch -> %s",
        record["norm"], f"{params:,}", record["final_test_acc"], record["best_val_acc"], record["best_epoch"],
        record["seconds_per_epoch"], out.resolve(),
    )  # fmt: skip
    return float(record["final_val_acc"])
