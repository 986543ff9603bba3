"""The training loop: device-resident data, batched augmentation, per-epoch evaluation.

The whole training split lives on the device as one uint8 tensor; an epoch is a shuffled
permutation cut into index slices, each batch augmented on the device. Metrics accumulate on
the device and are read once per epoch (no host sync per step).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from normsweep.base.registry import choice
from normsweep.base.results import EpochRecord
from normsweep.base.runtime import autocast, use_bf16
from normsweep.config import (
    AugmentConfig,
    Config,
    ConfigError,
    NormsweepError,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
)
from normsweep.data import DataInfo, Split, Splits
from normsweep.run.augment import augment_batch, normalize, to_float
from normsweep.run.compiling import COMPILE_MODES
from normsweep.run.optim import OPTIMIZERS, SCHEDULERS
from normsweep.run.resume import CheckpointError, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(NormsweepError, RuntimeError):
    """The training loss became NaN or infinite."""


EpochStats = EpochRecord  # one epoch's numbers, declared once: results.json's history and the checkpoint's


def peak_lr(cfg: OptimizerConfig, batch_size: int) -> float:
    """The learning rate a run trains with: ``optimizer.lr``, scaled to ``batch_size`` by ``optimizer.lr_scaling``.

    ``linear`` is the linear scaling rule (Goyal et al. 2017, arXiv:1706.02677): ``optimizer.lr ×
    batch_size / optimizer.base_batch_size``, the base being the batch size ``optimizer.lr`` is set
    for (each tuned recipe states its own; null: the shared recipe's, ``trainer.batch_size``'s
    default). The warm-up that rule needs is the scheduler's (``scheduler=onecycle`` rises linearly
    to this peak over the first ``scheduler.warmup_frac`` of the steps). Null: ``optimizer.lr`` as given.
    """
    if choice(cfg.lr_scaling) is None:
        return cfg.lr
    return cfg.lr * batch_size / (cfg.base_batch_size or TrainerConfig.batch_size)


def make_optimizer(params, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names (:data:`~normsweep.run.optim.OPTIMIZERS`), at peak learning rate ``lr``
    (:func:`peak_lr`)."""
    return OPTIMIZERS.entry(cfg.name)(params, cfg, lr)


def lr_factor(cfg: SchedulerConfig, step: int, total_steps: int) -> float:
    """The learning rate at ``step`` as a fraction of the peak (:func:`peak_lr`;
    :data:`~normsweep.run.optim.SCHEDULERS`)."""
    return SCHEDULERS.entry(cfg.name)(cfg, step / max(total_steps, 1))


def optimizer_and_schedule(
    params, cfg: Config, peak: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer ``optimizer.*`` names at peak learning rate ``peak``, and the ``scheduler.*`` schedule
    over ``total_steps`` steps (stepped once per training step)."""
    opt = make_optimizer(params, cfg.optimizer, peak)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.scheduler, s, total_steps))


def prepare_eval(split: Split, device: torch.device, info: DataInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized float images (with the data's mean and std, ``info``) and labels on ``device``, converted once
    for all epochs."""
    return normalize(to_float(split.x.to(device)), info.mean, info.std), split.y.to(device)


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
        with autocast(x.device, bf16):
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


def images_per_epoch(n_images: int, batch_size: int, drop_last: bool = False) -> int:
    """The training images an epoch uses: all of them, except that the last, partial batch is left out
    with ``drop_last`` (``trainer.drop_last``: every step one shape), and a last batch of one image
    always (BatchNorm cannot train on a single sample). None left is a ConfigError naming the keys."""
    last = n_images % batch_size  # the last batch's size (0: every batch full)
    n = n_images - (last if drop_last or last == 1 else 0)
    if n == 0 and drop_last:
        raise ConfigError(f"trainer.drop_last=true leaves out all {n_images} training images at "
                          f"trainer.batch_size={batch_size}: lower trainer.batch_size or set trainer.drop_last=false")  # fmt: skip
    if n == 0:
        raise ConfigError(f"{n_images} training image(s) are too few to train on: use more (data.train_size, "
                          "data.val_size)")  # fmt: skip
    return n


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    augment: AugmentConfig,
    gen: torch.Generator,
    memory_format: torch.memory_format = torch.contiguous_format,
    *,
    info: DataInfo,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of training batches, as :func:`train` takes them.

    ``x`` (uint8 images) and ``y`` live on the device; the epoch is a permutation drawn from
    ``gen``, cut into index slices of ``batch_size`` (:func:`images_per_epoch`, ``drop_last``), each batch
    augmented on the device (with ``gen``), normalized with the data's mean and std (``info``) and
    laid out in ``memory_format``.
    """
    n = images_per_epoch(len(y), batch_size, drop_last)
    perm = torch.randperm(len(y), generator=gen, device=y.device)[:n]
    mean, std = (torch.tensor(v, device=x.device) for v in (info.mean, info.std))  # once, not per batch
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        xb = normalize(augment_batch(to_float(x[idx]), augment, gen), mean, std)
        yield xb.contiguous(memory_format=memory_format), y[idx]


def make_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: WeightEMA | None = None,
    *,
    bf16: bool = False,
    label_smoothing: float = 0.0,
    graphs: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The training step :func:`train` takes on each batch: ``step(xb, yb) -> (loss, logits)``.

    Forward pass and loss (under bf16 autocast if ``bf16``), backward, optimizer step, then the
    learning-rate schedule's and the weight average's step where given. ``graphs``: ``model`` replays
    CUDA graphs (:data:`~normsweep.run.compiling.COMPILE_MODES`), whose outputs the next replay
    overwrites; each step starts a new one, and its (loss, logits) must be used before the next step.
    """

    def step(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(xb.device, bf16):
            loss, logits = train_step_loss(model, xb, yb, label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if ema is not None:
            ema.update()
        return loss, logits

    return step


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


@dataclass
class Training:
    """What one run's training loop holds, built once by :func:`start_training`: the model (as it is stepped,
    and as it is evaluated), its optimizer, schedule, random generator and weight average, the step, and the
    data on the device."""

    model: nn.Module  # the trained module: checkpoints and the returned weights
    eval_model: nn.Module  # what each epoch evaluates: the model, or its weight average (trainer.ema_decay)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # shuffling and augmentation
    ema: WeightEMA | None
    step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    train: tuple[torch.Tensor, torch.Tensor]  # uint8 images and labels
    val: tuple[torch.Tensor, torch.Tensor]  # normalized floats and labels
    test: tuple[torch.Tensor, torch.Tensor]
    info: DataInfo
    images_per_epoch: int
    steps_per_epoch: int
    peak_lr: float
    bf16: bool
    memory_format: torch.memory_format


def start_training(model: nn.Module, cfg: Config, splits: Splits, device: torch.device) -> Training:
    """Everything :func:`train` needs, on ``device``: the model in its memory layout (compiled for the steps
    with ``trainer.compile``), the data, the optimizer at the peak learning rate, the schedule, the generator
    seeded with ``trainer.seed`` and the weight average."""
    tc = cfg.trainer
    fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    train_data = splits.train.x.to(device), splits.train.y.to(device)
    val, test = prepare_eval(splits.val, device, splits.info), prepare_eval(splits.test, device, splits.info)
    n = images_per_epoch(len(train_data[1]), tc.batch_size, tc.drop_last)
    steps_per_epoch = len(range(0, n, tc.batch_size))
    peak = peak_lr(cfg.optimizer, tc.batch_size)
    if peak != cfg.optimizer.lr:
        log.info("peak learning rate %.4g: optimizer.lr=%g scaled to batch %d (optimizer.lr_scaling=linear)",
                 peak, cfg.optimizer.lr, tc.batch_size)  # fmt: skip
    opt, sched = optimizer_and_schedule(model.parameters(), cfg, peak, steps_per_epoch * tc.epochs)
    gen = torch.Generator(device=device).manual_seed(tc.seed)
    # The compiled module shares its parameters with ``model``; evaluation and checkpoints use ``model``.
    mode = COMPILE_MODES.entry(tc.compile) if tc.compile else None
    step_model = torch.compile(model, mode=mode.torch_mode) if mode else model
    ema = WeightEMA(model, tc.ema_decay) if tc.ema_decay else None
    bf16 = use_bf16(tc.bf16, device)
    graphs = mode is not None and mode.graphs and device.type == "cuda"
    step = make_step(step_model, opt, sched, ema, bf16=bf16, label_smoothing=tc.label_smoothing, graphs=graphs)
    return Training(
        model, ema.model if ema is not None else model, opt, sched, gen, ema, step, train_data, val, test,
        splits.info, n, steps_per_epoch, peak, bf16, fmt,
    )  # fmt: skip


def restore(t: Training, checkpoint: Path, epochs: int) -> list[EpochStats]:
    """Put ``t`` back in the state ``checkpoint`` saved (weights, optimizer, schedule, every random
    generator, the weight average) and return the history of the epochs it had finished."""
    state = load_checkpoint(checkpoint)
    t.model.load_state_dict(state["model"])
    t.opt.load_state_dict(state["optimizer"])
    t.sched.load_state_dict(state["scheduler"])
    t.gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if t.ema is not None:
        if not state.get("ema"):
            raise CheckpointError(f"cannot resume from {checkpoint}: it holds no EMA weights (trainer.ema_decay)")
        t.ema.load_state_dict(state["ema"])
    log.info("resuming from %s after epoch %d of %d", checkpoint, state["epoch"], epochs)
    return [EpochStats(**h) for h in state["history"]]


def train_epoch(t: Training, cfg: Config, epoch: int) -> tuple[float, float]:
    """One pass over the training images: (mean loss, accuracy in %); a loss that is not finite stops the run."""
    tc = cfg.trainer
    t.model.train()
    device = t.train[1].device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    bar = tqdm(
        batches(*t.train, tc.batch_size, cfg.augment, t.gen, t.memory_format, info=t.info, drop_last=tc.drop_last),
        total=t.steps_per_epoch,
        desc=f"epoch {epoch}/{tc.epochs}",
        unit="batch",
        leave=False,
        disable=None if tc.progress else True,  # None: only on a terminal
    )
    for xb, yb in bar:
        loss, logits = t.step(xb, yb)
        loss_sum += loss.detach().float() * len(yb)  # on the device: read once per epoch, no sync per step
        correct += (logits.argmax(1) == yb).sum()
    train_loss = loss_sum.item() / t.images_per_epoch
    if not math.isfinite(train_loss):
        raise NonFiniteLossError(
            f"training loss is {train_loss} in epoch {epoch}; lower optimizer.lr (now {cfg.optimizer.lr}, "
            f"peak {t.peak_lr:.4g} at batch {tc.batch_size})"
        )
    return train_loss, 100.0 * correct.item() / t.images_per_epoch


def evaluate(t: Training, channels_last: bool) -> tuple[float, float]:
    """(validation, test) accuracy in % of the evaluated model (:attr:`Training.eval_model`)."""
    return tuple(
        accuracy(predict(t.eval_model, x, channels_last=channels_last, bf16=t.bf16), y) for x, y in (t.val, t.test)
    )  # type: ignore[return-value]


def train(
    model: nn.Module,
    cfg: Config,
    splits: Splits,
    device: torch.device,
    on_epoch: Callable[[list[EpochStats]], None] | None = None,
    checkpoint: Path | None = None,
    config_record: dict | None = None,
) -> list[EpochStats]:
    """Train ``model`` for ``cfg.trainer.epochs`` epochs: set up (:func:`start_training`), resume from
    ``checkpoint`` where it exists (:func:`restore`), then per epoch train (:func:`train_epoch`), evaluate
    (:func:`evaluate`), save the checkpoint, log, and hand the history to ``on_epoch``.

    With ``trainer.ema_decay``, evaluation uses the weights' moving average, and ``model`` holds
    that average when training ends (the model that was evaluated is the one saved).
    """
    tc = cfg.trainer
    t = start_training(model, cfg, splits, device)
    history = restore(t, checkpoint, tc.epochs) if checkpoint is not None and checkpoint.exists() else []
    for epoch in range(len(history) + 1, tc.epochs + 1):
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(t, cfg, epoch)
        lr = t.opt.param_groups[0]["lr"]
        val_acc, test_acc = evaluate(t, tc.channels_last)
        stats = EpochStats(epoch, train_loss, train_acc, val_acc, test_acc, lr, time.perf_counter() - t0)
        history.append(stats)
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, t.opt, t.sched, t.gen, history, config_record or {}, t.ema)
        log.info(
            "epoch %2d/%d  loss %.4f  train %.2f%%  val %.2f%%  test %.2f%%  lr %.4g  %.1fs",
            epoch, tc.epochs, stats.train_loss, stats.train_acc, val_acc, test_acc, lr, stats.seconds,
        )  # fmt: skip
        if on_epoch:
            on_epoch(history)
    if t.ema is not None:
        model.load_state_dict(t.ema.model.state_dict())
    return history
