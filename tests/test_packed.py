"""Seeds packed into one stacked model (normsweep.run.packed) train as their separate runs do."""

from __future__ import annotations

import pytest
import torch

from normsweep.base.errors import ConfigError
from normsweep.run.build import model_from_config
from normsweep.run.optim import OPTIMIZERS
from normsweep.run.packed import train_packed
from normsweep.run.train import train

from .conftest import make_cfg

CPU = torch.device("cpu")
# fp32 on every CPU: a bf16 draw (AVX512-BF16) would round packed and separate convolutions apart at 1e-3
TINY = (
    "trainer.batch_size=25",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.bf16=false",
    "trainer.epochs=2",
)


def separate_run(cfg_args: tuple[str, ...], seed: int, splits):
    """What a run with ``trainer.seed=seed`` does: seed, build, train."""
    cfg = make_cfg(*cfg_args, f"trainer.seed={seed}")
    torch.manual_seed(seed)
    model = model_from_config(cfg, splits.info.num_classes, splits.info.image_size)
    return model, train(model, cfg, splits, CPU)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_steps_stacked_weights_as_it_steps_each_model_alone(name: str) -> None:
    """The packing's premise: each registered optimizer updates every element on its own (an optimizer with
    per-tensor norms, such as LARS or LAMB, would fail here and must not be packed)."""
    cfg = make_cfg(f"optimizer={name}", "optimizer.weight_decay=0.01").optimizer
    gen = torch.Generator().manual_seed(0)
    members = [[torch.randn(4, 3, generator=gen, requires_grad=True)] for _ in range(3)]
    stacked = torch.stack([m[0].detach() for m in members]).requires_grad_()
    alone = [OPTIMIZERS.entry(name)(m, cfg, 0.1) for m in members]
    together = OPTIMIZERS.entry(name)([stacked], cfg, 0.1)
    for _ in range(3):
        grads = torch.randn(3, 4, 3, generator=gen)
        for m, opt, g in zip(members, alone, grads):
            m[0].grad = g.clone()
            opt.step()
        stacked.grad = grads.clone()
        together.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([m[0].detach() for m in members]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_packed_seeds_without_dropout_train_as_their_separate_runs(splits, norm: str) -> None:
    """Compared where rounding is all that differs (the 100 training images are one batch: one step an epoch):
    two epochs' losses (the second computed after the first update; measured within 2e-7 relative) and
    schedule, and after one step every weight and BatchNorm statistic. Not after more steps: at lr 0.2 a
    rounding difference in one update moves the next one's weights by up to ~1e-3 along directions the norm
    layers make the loss blind to, by an amount that changes with the thread count."""
    args = (f"norm={norm}", "model.dropout=0", *TINY[:-1], "trainer.batch_size=100")
    for epochs in (2, 1):
        packed = train_packed(make_cfg(*args, f"trainer.epochs={epochs}"), [0, 1], splits, CPU)
        for seed, (model, history) in zip([0, 1], packed):
            alone, alone_history = separate_run((*args, f"trainer.epochs={epochs}"), seed, splits)
            assert [h.epoch for h in history] == list(range(1, epochs + 1))
            for p, a in zip(history, alone_history):
                assert p.train_loss == pytest.approx(a.train_loss, rel=1e-5), (seed, p, a)
                assert p.lr == pytest.approx(a.lr)
                assert abs(p.val_acc - a.val_acc) <= 5.0 and abs(p.test_acc - a.test_acc) <= 100 / 40  # one image
            if epochs == 1:
                for (name, w), (_, v) in zip(model.state_dict().items(), alone.state_dict().items()):
                    where = f"seed {seed}, {name}"
                    torch.testing.assert_close(
                        w.float(), v.float(), rtol=1e-5, atol=1e-5, msg=lambda m, at=where: f"{at}: {m}"
                    )
    (m0, h0), (m1, h1) = packed
    assert h0[-1].train_loss != h1[-1].train_loss  # two seeds, two models
    assert not torch.equal(next(m0.parameters()), next(m1.parameters()))


def test_packed_seeds_with_dropout_learn(splits) -> None:
    """Dropout under vmap (nn.Dropout's mask, not normsweep's CPU one: see the next test) trains."""
    cfg = make_cfg("model.dropout=0.2", "optimizer.lr=0.05", "augment=none", *TINY[:-1], "trainer.epochs=4")
    (m0, h0), (m1, h1) = train_packed(cfg, [0, 1], splits, CPU)
    for h in (h0, h1):
        assert h[-1].train_loss < h[0].train_loss and h[-1].train_acc > 30  # chance is 10%
    assert [h.train_loss for h in h0] != [h.train_loss for h in h1]
    assert next(m0.parameters()).requires_grad  # ordinary modules, as a run's model: to save or evaluate


def test_packing_refuses_what_it_does_not_do(splits) -> None:
    for extra, key in (("trainer.ema_decay=0.9", "trainer.ema_decay"), ("trainer.compile=kernels", "trainer.compile")):
        with pytest.raises(ConfigError, match=key):
            train_packed(make_cfg(*TINY, extra), [0, 1], splits, CPU)
    with pytest.raises(ConfigError, match="different seeds"):
        train_packed(make_cfg(*TINY), [3, 3], splits, CPU)


def test_packing_leaves_the_models_dropout_of_a_separate_run_as_it_was(splits) -> None:
    """The skeleton the step maps over is a copy: the models returned keep normsweep's CPU dropout mask."""
    from normsweep.models.cnn import Dropout

    cfg = make_cfg("model.dropout=0.1", *TINY[:-1], "trainer.epochs=1")
    ((model, _),) = train_packed(cfg, [0], splits, CPU)
    drops = [m for m in model.modules() if isinstance(m, Dropout)]
    assert drops and all(m.cheap_cpu_mask for m in drops)
