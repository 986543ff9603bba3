"""The training loop on small synthetic data: it learns, it is reproducible, it stops on NaN."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from normsweep.config import ConfigError, LrScaling, OptimizerConfig, SchedulerConfig, SchedulerName
from normsweep.run.build import model_from_config
from normsweep.run.train import NonFiniteLossError, lr_factor, peak_lr, predict, train

from .conftest import make_cfg


def test_onecycle_rises_linearly_to_the_peak_then_falls_to_the_final_fraction() -> None:
    cfg = SchedulerConfig(name=SchedulerName.onecycle, warmup_frac=0.25, final_lr_frac=0.1)
    assert lr_factor(cfg, 0, 100) == 0.0
    assert lr_factor(cfg, 25, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 100) == pytest.approx(0.4)
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 60, 100) > lr_factor(cfg, 80, 100)


def test_cosine_and_constant_schedules() -> None:
    cos = SchedulerConfig(name=SchedulerName.cosine, final_lr_frac=0.0)
    assert lr_factor(cos, 0, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 50, 100) == pytest.approx(0.5)
    assert lr_factor(cos, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(SchedulerConfig(name=SchedulerName.none), 37, 100) == 1.0


TINY = ("trainer.batch_size=25", "trainer.device=cpu", "trainer.progress=false")


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_training_learns_a_separable_task(splits, norm: str) -> None:
    cfg = make_cfg(f"norm={norm}", "trainer.epochs=6", "optimizer.lr=0.05", "augment=none", *TINY)
    torch.manual_seed(0)
    history = train(model_from_config(cfg), cfg, splits, torch.device("cpu"))
    assert len(history) == 6
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].train_acc > 60 and history[-1].test_acc > 50  # chance is 10%
    assert all(h.seconds > 0 for h in history)
    assert history[-1].lr == pytest.approx(0.0, abs=1e-9)  # onecycle ends at final_lr_frac=0


def test_same_seed_gives_the_same_run_and_another_seed_does_not(splits) -> None:
    def run(seed: int) -> list[float]:
        cfg = make_cfg("trainer.epochs=2", f"trainer.seed={seed}", *TINY)
        torch.manual_seed(seed)
        return [h.train_loss for h in train(model_from_config(cfg), cfg, splits, torch.device("cpu"))]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_drop_last_gives_every_step_one_shape_and_the_schedule_counts_those_steps(splits) -> None:
    """100 training images at batch 30: 3 full batches and one of 10; with trainer.drop_last the 10 are left out
    (other images each epoch: the permutation decides which), and the epoch's numbers are over the 90 used."""
    from normsweep.run.train import batches, images_per_epoch

    assert images_per_epoch(100, 30) == 100 and images_per_epoch(100, 30, drop_last=True) == 90
    assert images_per_epoch(91, 30) == 90  # a last batch of one image is always left out (BatchNorm)
    assert images_per_epoch(90, 30, drop_last=True) == 90
    with pytest.raises(ConfigError, match="trainer.drop_last=true leaves out all 20 training images at trainer.batch"):
        images_per_epoch(20, 30, drop_last=True)
    with pytest.raises(ConfigError, match="1 training image.s. are too few"):
        images_per_epoch(1, 30)
    cfg = make_cfg("trainer.batch_size=30", *TINY[1:])
    x, y = splits.train.x, splits.train.y
    sizes = {drop: [len(yb) for _, yb in batches(x, y, 30, cfg.augment, torch.Generator().manual_seed(0),
                                                 info=splits.info, drop_last=drop)]
             for drop in (False, True)}  # fmt: skip
    assert sizes == {False: [30, 30, 30, 10], True: [30, 30, 30]}
    schedule, losses = [], []
    for drop in ("false", "true"):
        cfg = make_cfg("trainer.epochs=2", "trainer.batch_size=30", f"trainer.drop_last={drop}",
                       "scheduler=onecycle", *TINY[1:])  # fmt: skip
        torch.manual_seed(0)
        model = model_from_config(cfg)
        steps = []
        model.register_forward_pre_hook(lambda m, args, seen=steps: seen.append(len(args[0])) if m.training else None)
        history = train(model, cfg, splits, torch.device("cpu"))
        schedule.append(history[0].lr)
        losses.append([h.train_loss for h in history])
        assert steps == sizes[drop == "true"] * 2, drop  # the batches the model trained on, both epochs
    # one-cycle over 8 steps, 4 of them done, vs over 6 steps, 3 done: the same point of the cycle
    assert schedule[0] == pytest.approx(schedule[1])
    assert losses[0] != losses[1]  # other batches, other numbers


@pytest.mark.slow
def test_a_graphs_compiled_run_trains_as_the_eager_run_on_the_cpu(splits) -> None:
    """trainer.compile=graphs on a CPU (no CUDA graphs there: fused kernels) with the drop_last it needs: the same
    losses as eager to rounding (the GPU's numbers come from benchmarks/gpu_check.py)."""
    losses = {}
    for mode in ("null", "graphs"):
        cfg = make_cfg("trainer.epochs=2", "trainer.drop_last=true", f"trainer.compile={mode}", "model.dropout=0",
                       "trainer.batch_size=50", "trainer.bf16=false", *TINY[1:])  # fmt: skip
        torch.manual_seed(0)
        losses[mode] = [h.train_loss for h in train(model_from_config(cfg), cfg, splits, torch.device("cpu"))]
    assert losses["graphs"] == pytest.approx(losses["null"], rel=1e-4)


def test_linear_lr_scaling_scales_the_lr_by_batch_size_over_the_base_batch_size() -> None:
    linear = OptimizerConfig(lr=0.2, lr_scaling=LrScaling.linear, base_batch_size=256)
    assert peak_lr(linear, 256) == 0.2 and peak_lr(linear, 512) == pytest.approx(0.4)
    assert peak_lr(linear, 2) == pytest.approx(0.2 * 2 / 256)
    assert peak_lr(OptimizerConfig(lr=0.2), 2) == 0.2  # lr_scaling null: the lr as given


def test_the_batch_size_study_scales_each_norms_lr_from_its_recipes_batch() -> None:
    recipe_batches = set()
    for norm in ("batch", "group", "layer", "frn", "evonorm_s0"):  # the study's command
        recipe = make_cfg(f"norm={norm}")  # without the study: the recipe's batch size
        study = make_cfg("experiment=batch_size", f"norm={norm}", "trainer.batch_size=8")
        assert study.trainer.batch_size == 8 and study.optimizer.lr == recipe.optimizer.lr
        assert peak_lr(study.optimizer, 8) == pytest.approx(recipe.optimizer.lr * 8 / recipe.trainer.batch_size), norm
        assert peak_lr(recipe.optimizer, recipe.trainer.batch_size) == recipe.optimizer.lr  # off outside the study
        recipe_batches.add(recipe.trainer.batch_size)
    assert len(recipe_batches) > 1  # tuned recipes (optimizer.base_batch_size) and the shared one (null) both seen


def test_training_runs_at_the_scaled_learning_rate(splits) -> None:
    cfg = make_cfg("trainer.epochs=1", "scheduler=none", "optimizer.lr=0.1", "optimizer.lr_scaling=linear",
                   "optimizer.base_batch_size=100", *TINY)  # fmt: skip
    torch.manual_seed(0)
    (epoch,) = train(model_from_config(cfg), cfg, splits, torch.device("cpu"))
    assert epoch.lr == pytest.approx(0.1 * 25 / 100)


def test_evaluation_uses_batchnorms_running_statistics_whatever_the_evaluation_batch() -> None:
    torch.manual_seed(0)
    model = model_from_config(make_cfg("norm=batch"))
    model.train()(torch.randn(16, 3, 32, 32) * 2 + 1)  # running statistics away from their initial values
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x).argmax(1)
        in_train_mode = copy.deepcopy(model).train()(x).argmax(1)  # a copy: this moves running statistics
    assert not torch.equal(expected, in_train_mode)  # the test would see batch statistics being used
    model.train()  # as the training loop leaves it before each evaluation
    for batch_size in (1, 5, 12):
        assert torch.equal(predict(model, x, batch_size=batch_size), expected)
    assert model.training  # predict() restores the mode it found


def test_non_finite_loss_stops_the_run_with_the_epoch_and_the_fix(splits) -> None:
    cfg = make_cfg("norm=none", "trainer.epochs=3", "optimizer.lr=1e12", "scheduler=none", *TINY)
    torch.manual_seed(0)
    with pytest.raises(NonFiniteLossError, match=r"in epoch 1; lower optimizer.lr"):
        train(model_from_config(cfg), cfg, splits, torch.device("cpu"))


def test_channels_last_and_plain_layout_give_the_same_loss(splits) -> None:
    """The fast path (channels_last) must not change results: same batch, same weights, same loss."""
    from normsweep.run.augment import normalize, to_float
    from normsweep.run.train import train_step_loss

    x = normalize(to_float(splits.train.x[:50]), splits.info.mean, splits.info.std)
    y = splits.train.y[:50]
    for norm in ("batch", "group", "layer"):
        cfg = make_cfg(f"norm={norm}")
        torch.manual_seed(0)
        ref = model_from_config(cfg)
        fast = model_from_config(cfg).to(memory_format=torch.channels_last)
        fast.load_state_dict(ref.state_dict())
        loss_ref, _ = train_step_loss(ref, x, y, 0.1)
        loss_fast, _ = train_step_loss(fast, x.contiguous(memory_format=torch.channels_last), y, 0.1)
        assert math.isclose(loss_ref.item(), loss_fast.item(), rel_tol=1e-5), norm


def test_bf16_autocast_trains_and_stays_close_to_fp32(splits) -> None:
    """bf16 changes the arithmetic on purpose; its loss on the same batch stays within 2% of fp32."""
    from normsweep.base.runtime import autocast
    from normsweep.run.augment import normalize, to_float
    from normsweep.run.train import train_step_loss

    x, y = normalize(to_float(splits.train.x[:50]), splits.info.mean, splits.info.std), splits.train.y[:50]
    for norm in ("batch", "group", "layer"):
        cfg = make_cfg(f"norm={norm}")
        torch.manual_seed(0)
        model = model_from_config(cfg)
        ref, _ = train_step_loss(model, x, y, 0.1)
        with autocast(torch.device("cpu"), True):
            low, _ = train_step_loss(model, x, y, 0.1)
        assert math.isclose(ref.item(), low.item(), rel_tol=0.02), norm
    cfg = make_cfg("trainer.epochs=2", "trainer.bf16=true", *TINY)
    history = train(model_from_config(cfg), cfg, splits, torch.device("cpu"))
    assert history[-1].train_loss < history[0].train_loss


@pytest.mark.slow
def test_compiled_training_step_gives_the_same_loss(splits) -> None:
    """trainer.compile must not change results: same weights, same batch, same loss as eager."""
    from normsweep.run.augment import normalize, to_float
    from normsweep.run.train import train_step_loss

    x, y = normalize(to_float(splits.train.x[:50]), splits.info.mean, splits.info.std), splits.train.y[:50]
    cfg = make_cfg("norm=group")
    torch.manual_seed(0)
    model = model_from_config(cfg)
    eager, _ = train_step_loss(model, x, y, 0.1)
    compiled, _ = train_step_loss(torch.compile(model), x, y, 0.1)
    assert math.isclose(eager.item(), compiled.item(), rel_tol=1e-4)


def test_bf16_auto_follows_the_cpu_flags_and_explicit_settings_win() -> None:
    from normsweep.base.runtime import cpu_has_native_bf16, use_bf16

    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 sha_ni\n")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_tile amx_bf16\n")
    assert not cpu_has_native_bf16("flags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not cpu_has_native_bf16("no flags line at all\n")
    cpu = torch.device("cpu")
    assert use_bf16(None, cpu) == cpu_has_native_bf16()  # auto reads this machine's /proc/cpuinfo
    assert use_bf16(True, cpu) is True and use_bf16(False, cpu) is False
