"""Several seeds of one config trained together in one process: one stacked model, one step for all of them.

On a GPU the study's network is bound by kernel launches, not arithmetic (benchmarks/results/gpu_check-h200.md:
57,000-82,000 img/s per run, bf16 gaining nothing). K runs in K processes pay K times the launches, K CUDA
contexts and K data loads. Here the K models' weights are stacked (``torch.func.stack_module_state``) and the
training step is mapped over them (``torch.func.vmap``): each layer is one batched kernel for all K models, and
the data is loaded once. Whether that is faster than K processes sharing the GPU is what
``benchmarks/packed.py`` (a stage of the GPU check) measures; on a CPU it is not (the arithmetic is the
bottleneck there), so :func:`train_packed` is a library function and a benchmark, not yet a launcher option.

The same as K separate runs with ``trainer.seed`` = each seed (tests/test_packed.py checks it):
- each model's initial weights (``torch.manual_seed(seed)`` before it is built, as a run does);
- its batches: the shuffle and the augmentation from its own generator seeded with the seed (as a run does);
- its loss, gradients and update: the loss is the sum of the K models' losses, whose gradient for each model is
  its own loss's; every optimizer of :data:`~normsweep.run.optim.OPTIMIZERS` updates each element on its own,
  so stepping the stacked weights steps each model as its own optimizer would; the same schedule;
- BatchNorm's running statistics (the buffers are stacked too).

What differs: the dropout masks (drawn for all models at once, from the torch generator seeded with the first
seed), and the rounding of the batched convolutions. Without dropout the first steps agree with separate runs to
rounding; over many steps the rounding grows, as it does between separate runs on another thread count (BN at its
recipe on the CPU: tenfold a step early on; docs/speed.md has the measurement); with dropout each model is a fair
draw of its seed, not the same draw.

Not packed (refused): ``trainer.ema_decay`` and ``trainer.compile``. ``trainer.channels_last`` does not apply
(vmap folds the models into the convolutions' batch). Models whose layers ``vmap`` cannot map (in-place
buffer updates other than BatchNorm's, data-dependent control flow) fail at the first step with vmap's error.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from normsweep.base.errors import ConfigError
from normsweep.base.runtime import autocast, use_bf16
from normsweep.config import Config
from normsweep.data import Splits
from normsweep.models.cnn import Dropout
from normsweep.run.build import model_from_config
from normsweep.run.train import (
    EpochStats,
    NonFiniteLossError,
    accuracy,
    batches,
    images_per_epoch,
    optimizer_and_schedule,
    peak_lr,
    predict,
    prepare_eval,
    train_step_loss,
)


def refuse_unpackable(cfg: Config, seeds: Sequence[int]) -> None:
    """A ConfigError for what :func:`train_packed` does not do, naming the key."""
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"packed seeds {list(seeds)}: expected one or more different seeds")
    for key, value in (("trainer.ema_decay", cfg.trainer.ema_decay), ("trainer.compile", cfg.trainer.compile)):
        if value is not None:
            raise ConfigError(f"{key}={value!r} is not packed: set it to null to train seeds packed, or run them apart")


def _stacked_models(cfg: Config, seeds: Sequence[int], splits: Splits, device: torch.device):
    """One model per seed, each built after ``torch.manual_seed(seed)`` as a run builds its model; their weights
    and buffers stacked (a leading dimension of len(seeds)); and the weightless module the step maps over."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(model_from_config(cfg, splits.info.num_classes, splits.info.image_size).to(device))
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    for m in skeleton.modules():
        if isinstance(m, Dropout):
            m.cheap_cpu_mask = False  # its hand-drawn CPU mask cannot be mapped; vmap draws nn.Dropout's
    return models, params, buffers, skeleton


@torch.no_grad()
def _unstack_into(model: nn.Module, params: dict, buffers: dict, k: int) -> None:
    """Member ``k`` of the stacked weights and buffers, copied into ``model`` (to evaluate or save it)."""
    for name, p in model.named_parameters():
        p.copy_(params[name][k])
    for name, b in model.named_buffers():
        b.copy_(buffers[name][k])


def train_packed(
    cfg: Config, seeds: Sequence[int], splits: Splits, device: torch.device
) -> list[tuple[nn.Module, list[EpochStats]]]:
    """Train ``cfg``'s model once per seed, all in one stacked step; per seed the trained model and its history
    (as :func:`~normsweep.run.train.train` returns for ``trainer.seed`` = that seed; the module docstring says
    what is the same and what is not). Each epoch's ``seconds`` is the pack's, shared by its members."""
    refuse_unpackable(cfg, seeds)
    tc, info, k = cfg.trainer, splits.info, len(seeds)
    models, params, buffers, skeleton = _stacked_models(cfg, seeds, splits, device)
    train_x, train_y = splits.train.x.to(device), splits.train.y.to(device)
    val, test = prepare_eval(splits.val, device, info), prepare_eval(splits.test, device, info)
    n = images_per_epoch(len(train_y), tc.batch_size, tc.drop_last)
    peak = peak_lr(cfg.optimizer, tc.batch_size)
    opt, sched = optimizer_and_schedule(list(params.values()), cfg, peak, len(range(0, n, tc.batch_size)) * tc.epochs)
    gens = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    torch.manual_seed(seeds[0])  # the dropout masks of all members
    bf16 = use_bf16(tc.bf16, device)

    def member_loss(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return train_step_loss(lambda inputs: functional_call(skeleton, (p, b), (inputs,)), x, y, tc.label_smoothing)

    step_all = vmap(member_loss, randomness="different")
    histories: list[list[EpochStats]] = [[] for _ in seeds]
    skeleton.train()
    for epoch in range(1, tc.epochs + 1):
        t0 = time.perf_counter()
        loss_sum = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device, dtype=torch.int64)
        streams = [batches(train_x, train_y, tc.batch_size, cfg.augment, g, info=info, drop_last=tc.drop_last)
                   for g in gens]  # fmt: skip
        for pairs in zip(*streams):
            xb, yb = torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
            with autocast(device, bf16):
                losses, logits = step_all(params, buffers, xb, yb)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            sched.step()
            loss_sum += losses.detach().float() * yb.shape[1]
            correct += (logits.argmax(-1) == yb).sum(1)
        train_loss, train_acc = (loss_sum / n).tolist(), (100.0 * correct / n).tolist()
        bad = [seed for seed, loss in zip(seeds, train_loss) if not math.isfinite(loss)]
        if bad:
            raise NonFiniteLossError(f"training loss is not finite in epoch {epoch} for seed(s) {bad}; "
                                     f"lower optimizer.lr (now {cfg.optimizer.lr}, peak {peak:.4g})")  # fmt: skip
        lr = opt.param_groups[0]["lr"]
        accs = []
        for i, model in enumerate(models):
            _unstack_into(model, params, buffers, i)
            accs.append([accuracy(predict(model, x, bf16=bf16), y) for x, y in (val, test)])
        seconds = time.perf_counter() - t0
        for i, (val_acc, test_acc) in enumerate(accs):
            histories[i].append(EpochStats(epoch, train_loss[i], train_acc[i], val_acc, test_acc, lr, seconds))
    return list(zip(models, histories))
