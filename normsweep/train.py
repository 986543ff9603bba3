"""The training loop: device-resident data, batched augmentation, per-epoch evaluation.

The whole training split lives on the device as one uint8 tensor; an epoch is a shuffled
permutation cut into index slices, each batch augmented on the device. Metrics accumulate on
the device and are read once per epoch (no host sync per step).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import augment_batch, normalize, to_float
from .config import Config, NormsweepError, OptimizerConfig, SchedulerConfig
from .data import Split, Splits
from .results import save_torch

log = logging.getLogger(__name__)


class NonFiniteLossError(NormsweepError, RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float
    test_acc: float
    lr: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but PyTorch sees no CUDA GPU; pass trainer.device=cpu")
    return torch.device(name)


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    name = getattr(cfg.name, "value", cfg.name)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer.name={name!r} is unknown")


def lr_factor(cfg: SchedulerConfig, step: int, total_steps: int) -> float:
    """The learning rate at ``step`` as a fraction of ``optimizer.lr``."""
    name = getattr(cfg.name, "value", cfg.name)
    progress = step / max(total_steps, 1)
    if name == "none":
        return 1.0
    if name == "cosine":
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "onecycle":  # linear up, then linear down
        if progress < cfg.warmup_frac:
            return progress / cfg.warmup_frac
        return 1.0 - (1.0 - cfg.final_lr_frac) * (progress - cfg.warmup_frac) / (1 - cfg.warmup_frac)
    raise ValueError(f"scheduler.name={name!r} is unknown")


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks instead of returning them to the OS (Linux).

    By default glibc serves every allocation above 32 MB (one fp32 activation of a 16-channel
    32x32 map at batch 512 is 33.5 MB) with a fresh ``mmap`` and unmaps it on free, so each
    training step page-faults its activations in again; that measured 15-35% of an fp32 CPU step.
    Turning ``mmap`` off (the heap then grows instead, falling back to ``mmap`` only if it cannot)
    and not trimming the heap does what jemalloc/tcmalloc via LD_PRELOAD do, in-process. Returns
    whether it applied; a no-op on other C libraries.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)  # the job and the training loop both ask; read /proc/cpuinfo once
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo's flags."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False  # not Linux, or no flags line: assume no native bf16
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[-1].split()))


def use_bf16(setting: bool | None, device: torch.device) -> bool:
    """``trainer.bf16``: true/false as given; null = on for GPUs and CPUs with native bf16.

    On CPUs without it, bf16 is emulated and slower than fp32, so auto leaves it off there.
    """
    if setting is not None:
        return setting
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def prepare_eval(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized float images and labels on ``device``, converted once for all epochs."""
    return normalize(to_float(split.x.to(device))), split.y.to(device)


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 512,
    channels_last: bool = False,
    bf16: bool = False,
    tta_flip: bool = False,
) -> torch.Tensor:
    """Predicted class of every image in ``x`` (normalized floats), in eval mode.

    ``tta_flip``: test-time augmentation, the class of the mean of the logits of each image and
    its horizontal mirror.
    """
    was_training = model.training
    model.eval()
    preds = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(x.device, bf16):
            logits = model(xb).float()
            if tta_flip:
                logits = logits + model(xb.flip(3)).float()
            preds.append(logits.argmax(1))
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64, device=x.device)


def accuracy(preds: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (preds == y).float().mean().item() if len(y) else float("nan")


def train_step_loss(
    model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass and loss of one batch; returns (loss, logits)."""
    logits = model(xb)
    return F.cross_entropy(logits, yb, label_smoothing=label_smoothing), logits


class WeightEMA:
    """An exponential moving average of a model's weights, the model that is evaluated (``trainer.ema_decay``).

    Updated after every optimizer step with decay ``min(decay, (1 + n) / (10 + n))`` at update n,
    so the average is not dominated by the random initial weights early in a short run. Every
    floating-point entry of the state dict is averaged, BatchNorm's running statistics included
    (the timm ``ModelEmaV2`` convention: the averaged statistics follow the averaged weights as
    closely as the weights move slowly against the decay horizon); integer buffers
    (``num_batches_tracked``) are copied. No trainable parameters: the copy has ``requires_grad`` off.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self._floats = [(e, v) for e, v in pairs if e.dtype.is_floating_point]
        self._others = [(e, v) for e, v in pairs if not e.dtype.is_floating_point]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        if self._floats:
            ema, live = zip(*self._floats)
            torch._foreach_lerp_(list(ema), list(live), weight)
        for e, v in self._others:
            e.copy_(v)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


CHECKPOINT_VERSION = 1


def save_checkpoint(
    path: Path, model, opt, sched, gen: torch.Generator, history: list[EpochStats], config: dict,
    ema: WeightEMA | None = None,
) -> None:
    """Everything needed to continue training exactly where it stopped, written atomically."""
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
    from .results import UnsafeFileError, load_torch

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


class CheckpointError(NormsweepError, RuntimeError):
    """A checkpoint that cannot be resumed from."""


def train(
    model: nn.Module,
    cfg: Config,
    splits: Splits,
    device: torch.device,
    on_epoch: Callable[[list[EpochStats]], None] | None = None,
    checkpoint: Path | None = None,
    config_record: dict | None = None,
) -> list[EpochStats]:
    """Train ``model`` for ``cfg.trainer.epochs`` epochs.

    ``on_epoch`` sees the history after each epoch. With ``checkpoint``, the full training state
    is saved there after every epoch, and training resumes from it when it exists.
    With ``trainer.ema_decay``, evaluation uses the weights' moving average, and ``model`` holds
    that average when training ends (the model that was evaluated is the one saved).
    """
    tc = cfg.trainer
    bf16 = use_bf16(tc.bf16, device)
    fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    train_x, train_y = splits.train.x.to(device), splits.train.y.to(device)
    val_x, val_y = prepare_eval(splits.val, device)
    test_x, test_y = prepare_eval(splits.test, device)
    # A last batch of one image is skipped: BatchNorm cannot train on a single sample.
    n = len(train_y) - 1 if len(train_y) % tc.batch_size == 1 else len(train_y)
    starts = range(0, n, tc.batch_size)
    total_steps = len(starts) * tc.epochs

    opt = make_optimizer(model.parameters(), cfg.optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.scheduler, s, total_steps))
    gen = torch.Generator(device=device).manual_seed(tc.seed)
    # The compiled module shares its parameters with ``model``; evaluation and checkpoints use ``model``.
    step_model = torch.compile(model, mode=tc.compile) if tc.compile else model
    ema = WeightEMA(model, tc.ema_decay) if tc.ema_decay else None
    eval_model = ema.model if ema is not None else model

    history: list[EpochStats] = []
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = [EpochStats(**h) for h in state["history"]]
        if ema is not None:
            if not state.get("ema"):
                raise CheckpointError(f"cannot resume from {checkpoint}: it holds no EMA weights (trainer.ema_decay)")
            ema.load_state_dict(state["ema"])
        log.info("resuming from %s after epoch %d of %d", checkpoint, state["epoch"], tc.epochs)
    for epoch in range(len(history) + 1, tc.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        perm = torch.randperm(len(train_y), generator=gen, device=device)[:n]
        bar = tqdm(
            starts,
            desc=f"epoch {epoch}/{tc.epochs}",
            unit="batch",
            leave=False,
            disable=None if tc.progress else True,  # None: only on a terminal
        )
        for i in bar:
            idx = perm[i : i + tc.batch_size]
            xb = normalize(augment_batch(to_float(train_x[idx]), cfg.augment, gen))
            yb = train_y[idx]
            with _autocast(device, bf16):
                loss, logits = train_step_loss(step_model, xb.contiguous(memory_format=fmt), yb, tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update()
            loss_sum += loss.detach().float() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
        train_loss = loss_sum.item() / n
        lr = opt.param_groups[0]["lr"]
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(
                f"training loss is {train_loss} in epoch {epoch}; lower optimizer.lr (now {cfg.optimizer.lr})"
            )
        val_acc = accuracy(predict(eval_model, val_x, channels_last=tc.channels_last, bf16=bf16), val_y)
        test_acc = accuracy(predict(eval_model, test_x, channels_last=tc.channels_last, bf16=bf16), test_y)
        stats = EpochStats(
            epoch, train_loss, 100.0 * correct.item() / n, val_acc, test_acc, lr, time.perf_counter() - t0
        )
        history.append(stats)
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, opt, sched, gen, history, config_record or {}, ema)
        log.info(
            "epoch %2d/%d  loss %.4f  train %.2f%%  val %.2f%%  test %.2f%%  lr %.4g  %.1fs",
            epoch, tc.epochs, stats.train_loss, stats.train_acc, val_acc, test_acc, lr, stats.seconds,
        )  # fmt: skip
        if on_epoch:
            on_epoch(history)
    if ema is not None:
        model.load_state_dict(ema.model.state_dict())
    return history
