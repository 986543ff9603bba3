"""The levers of the fair comparison: Weight Standardization, weight EMA, flip TTA, per-norm recipes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from normsweep.config import SearchConfig
from normsweep.models import WSConv2d, build_model, count_params
from normsweep.run.build import model_from_config
from normsweep.run.train import WeightEMA, accuracy, predict, prepare_eval, train
from normsweep.search.trials import make_pruner

from .conftest import assert_resume_matches_uninterrupted, make_cfg

TINY = ("trainer.batch_size=25", "trainer.device=cpu", "trainer.progress=false", "model.dropout=0.1")
RESNET = dict(widths=[16, 24, 36, 56], depths=[1, 1, 0])


# ------------------------------------------------------------------ Weight Standardization


def test_ws_effective_weights_have_zero_mean_and_unit_variance_per_output_channel() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(8, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(torch.randn(16, 1, 1, 1) * 3)  # far from standardized
    w = conv.standardized_weight()
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(16), atol=1e-6)
    assert torch.allclose(w.var(dim=(1, 2, 3), unbiased=False), torch.ones(16), atol=1e-4)
    x = torch.randn(2, 8, 5, 5)
    expected = nn.functional.conv2d(x, w, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    assert not torch.allclose(conv(x), nn.functional.conv2d(x, conv.weight, padding=1), atol=1e-2)


@pytest.mark.parametrize("arch,kwargs", [("resnet", RESNET), ("study", {})])
@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_ws_adds_no_parameters_and_replaces_every_conv_that_feeds_a_norm(arch, kwargs, norm) -> None:
    groups = 2
    plain = build_model(arch, norm, groups, 0.0, **kwargs)
    ws = build_model(arch, norm, groups, 0.0, **kwargs, ws=True)
    assert count_params(ws) == count_params(plain)
    n3x3 = sum(1 for m in plain.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert sum(isinstance(m, WSConv2d) for m in ws.modules()) == n3x3 > 0
    assert not any(isinstance(m, WSConv2d) for m in plain.modules())
    assert ws(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_norm_ws_reaches_the_model_from_the_config() -> None:
    model = model_from_config(make_cfg("norm=batch", "norm.ws=true"))
    assert any(isinstance(m, WSConv2d) for m in model.modules())
    model = model_from_config(make_cfg("norm=batch", "norm.ws=false"))
    assert not any(isinstance(m, WSConv2d) for m in model.modules())


# ------------------------------------------------------------------ EMA


def test_ema_update_is_a_warmed_up_moving_average_and_copies_integer_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = WeightEMA(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.model.parameters())
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(5)
    ema.update()
    d = min(0.9, 2 / 11)  # warm-up: (1 + n) / (10 + n) at n = 1
    live = model.state_dict()
    for key, old in before.items():
        got = ema.model.state_dict()[key]
        if old.dtype.is_floating_point:
            assert torch.allclose(got, d * old + (1 - d) * live[key]), key
        else:
            assert torch.equal(got, live[key]), key
    ema.updates = 10_000
    assert ema.current_decay() == 0.9


def test_with_ema_the_evaluated_and_returned_model_is_the_average(splits) -> None:
    cfg = make_cfg("trainer.epochs=2", "trainer.ema_decay=0.9", *TINY)
    torch.manual_seed(0)
    model = model_from_config(cfg)
    seen = []
    history = train(model, cfg, splits, torch.device("cpu"), on_epoch=lambda h: seen.append(h[-1]))
    # The model handed back holds the EMA weights: its test accuracy is the one reported.
    x, y = prepare_eval(splits.test, torch.device("cpu"), splits.info)
    assert accuracy(predict(model, x, channels_last=True), y) == pytest.approx(history[-1].test_acc)

    # Same seed without EMA trains the same raw weights but evaluates and returns them, not the average.
    cfg_plain = make_cfg("trainer.epochs=2", *TINY)
    torch.manual_seed(0)
    plain = model_from_config(cfg_plain)
    plain_history = train(plain, cfg_plain, splits, torch.device("cpu"))
    assert [h.train_loss for h in plain_history] == [h.train_loss for h in history]  # EMA does not touch training
    differs = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values())]
    assert any(differs)


# ------------------------------------------------------------------ flip TTA


def test_flip_tta_predicts_the_class_of_the_mean_of_image_and_mirror_logits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()  # not mirror-invariant
    x = torch.randn(40, 3, 32, 32)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))).argmax(1)
        plain = model(x).argmax(1)
    got = predict(model, x, batch_size=16, tta_flip=True)
    assert torch.equal(got, expected)
    assert torch.equal(predict(model, x, batch_size=16), plain)
    assert not torch.equal(expected, plain)  # the test would notice TTA being ignored


# ------------------------------------------------------------------ resume with every lever on


def test_resume_reproduces_an_uninterrupted_run_with_ws_and_ema(splits, tmp_path: Path) -> None:
    cfg = make_cfg("trainer.epochs=3", "augment=seed", "norm=group", "norm.groups=2", "norm.ws=true",
                   "trainer.ema_decay=0.8", *TINY)  # fmt: skip
    ckpt = assert_resume_matches_uninterrupted(cfg, splits, tmp_path)
    assert torch.load(ckpt, weights_only=True)["ema"]["updates"] > 0


# ------------------------------------------------------------------ pruners and config


@pytest.mark.parametrize(
    "name,cls",
    [("hyperband", optuna.pruners.HyperbandPruner), ("successive_halving", optuna.pruners.SuccessiveHalvingPruner)],
)
def test_multi_fidelity_pruners(name: str, cls) -> None:
    assert isinstance(make_pruner(SearchConfig(pruner=name, min_resource=2, reduction_factor=2)), cls)


def test_successive_halving_prunes_the_worse_half_at_the_first_rung() -> None:
    study = optuna.create_study(
        direction="maximize", pruner=make_pruner(SearchConfig(pruner="successive_halving", reduction_factor=2))
    )
    for value in (50.0, 60.0, 70.0):  # three trials reach the first rung (epoch 1)
        t = study.ask()
        t.report(value, 1)
        t.should_prune()  # records the trial's value at the rung
        study.tell(t, value)
    worse, better = study.ask(), study.ask()
    worse.report(40.0, 1)
    better.report(80.0, 1)
    assert worse.should_prune() and not better.should_prune()


def test_each_norm_gets_its_recipe_and_recipe_shared_gives_one_for_all() -> None:
    recipes = Path(__file__).resolve().parents[1] / "conf" / "recipe"
    shared = make_cfg("recipe=shared", "norm=batch")
    for norm in sorted(p.stem for p in recipes.glob("*.yaml") if p.stem != "shared"):  # a norm's file, tuned or not
        tuned = OmegaConf.structured(make_cfg(f"norm={norm}"))
        recipe = OmegaConf.load(recipes / f"{norm}.yaml")  # the new norms' files set nothing: the shared recipe
        for key in _leaf_keys(recipe):  # every value the recipe file sets reaches that norm's config
            assert OmegaConf.select(tuned, key) == OmegaConf.select(recipe, key), (norm, key)
        controlled = make_cfg(f"norm={norm}", "recipe=shared")
        assert controlled.optimizer == shared.optimizer and controlled.trainer == shared.trainer
        assert controlled.model == shared.model and controlled.norm.ws is False
    seed = make_cfg("experiment=seed", "norm=group")  # the published study stays as published
    assert not seed.norm.ws and seed.trainer.ema_decay is None and seed.optimizer.lr == 0.01


def _leaf_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        if OmegaConf.is_dict(v):
            keys += _leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys
