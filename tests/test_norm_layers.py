"""The norms proposed for small batches, each against its paper's formula (normsweep/norms/layers.py):
Batch Renormalization, FRN + TLU, EvoNorm-S0 and EvoNorm-B0; and, for every norm of the registry,
batch independence or running statistics in evaluation, and an exact resume.

The reference formulas here are written from the papers, per sample and channel with explicit loops
where that is how the paper states the statistic, so they share no code with the layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from normsweep.data import load_raw, make_splits
from normsweep.norms import NORMS, norm_layer
from normsweep.norms.layers import BatchRenorm2d, EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTLU2d

from .conftest import assert_resume_matches_uninterrupted, make_cfg

TINY = ("trainer.batch_size=25", "trainer.device=cpu", "trainer.progress=false", "model.dropout=0.1")


def randomized(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``layer`` with every parameter moved off its initial value (γ≠1, β≠0, ...), so none is a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def gradcheck(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """torch.autograd.gradcheck in float64 of ``layer``'s output with respect to its input and every
    parameter. Each evaluation starts from the same buffers (running statistics, step count)."""
    layer = layer.double()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    buffers = {n: b.detach().clone() for n, b in layer.named_buffers()}

    def f(x, *ps):
        state = dict(zip(names, ps)) | {n: b.clone() for n, b in buffers.items()}
        return functional_call(layer, state, (x,))

    return torch.autograd.gradcheck(f, (x.double().requires_grad_(True), *params))


# ------------------------------------------------------------------ Batch Renormalization


def batch_renorm_reference(x, mu, sigma, gamma, beta, r_max, d_max, eps=1e-5):
    """Ioffe 2017, Algorithm 1 (training): returns (y, μ_B, σ_B, r, d); r and d are stop-gradient."""
    mean = x.mean(dim=(0, 2, 3))
    std = ((x - per_channel(mean)) ** 2).mean(dim=(0, 2, 3)).add(eps).sqrt()
    r = (std / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - mu) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - per_channel(mean)) / per_channel(std) * per_channel(r) + per_channel(d)
    return per_channel(gamma) * x_hat + per_channel(beta), mean, std, r, d


def renorm(r_max=2.0, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0, channels=4) -> BatchRenorm2d:
    layer = randomized(BatchRenorm2d(channels, r_max, d_max, warmup_steps, r_max_steps, d_max_steps))
    layer.running_mean.copy_(torch.tensor([0.0, 3.0, -1.0, 0.5])[:channels])
    layer.running_std.copy_(torch.tensor([1.0, 0.2, 2.5, 1.1])[:channels])
    return layer


def channel_data(n: int = 8, channels: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale, shift = torch.tensor([1.0, 1.0, 1.0, 1.2]), torch.tensor([0.2, 0.0, 0.0, 0.4])
    return torch.randn(n, channels, 5, 5, generator=gen) * per_channel(scale[:channels]) + per_channel(shift[:channels])


def test_batch_renorm_trains_by_the_papers_algorithm_and_moves_its_running_mean_and_std() -> None:
    layer, x = renorm(), channel_data()
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    expected, mean, std, r, d = batch_renorm_reference(x, mu, sigma, layer.weight, layer.bias, 2.0, 0.5)
    # the data exercises both sides of each clip: some channels inside the bounds, some clipped
    assert ((r > 1 / 2.0) & (r < 2.0)).any() and ((r == 2.0) | (r == 0.5)).any()
    assert (d.abs() < 0.5).any() and (d.abs() == 0.5).any()
    assert torch.allclose(layer.train()(x), expected, atol=1e-5)
    assert torch.allclose(layer.running_mean, mu + 0.1 * (mean - mu), atol=1e-6)
    assert torch.allclose(layer.running_std, sigma + 0.1 * (std - sigma), atol=1e-6)
    assert layer.num_batches_tracked.item() == 1


def test_batch_renorm_evaluates_with_its_running_statistics_one_sample_at_a_time() -> None:
    layer, x = renorm().eval(), channel_data()
    expected = per_channel(layer.weight) * (x - per_channel(layer.running_mean)) / per_channel(layer.running_std)
    assert torch.allclose(layer(x), expected + per_channel(layer.bias), atol=1e-5)
    assert torch.allclose(layer(x[:1]), layer(x)[:1], atol=1e-6)
    assert layer.num_batches_tracked.item() == 0  # evaluation is not a training step


def test_batch_renorm_is_batchnorm_during_its_warm_up_then_relaxes_linearly() -> None:
    layer, x = renorm(r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=30, d_max_steps=20), channel_data()
    bn = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=1e-5)
    assert torch.allclose(layer.train()(x), bn, atol=1e-5)  # r = 1, d = 0 whatever the running statistics
    limits = {step: layer.limits(step) for step in (0, 9, 10, 15, 20, 25, 30, 1000)}
    assert limits == {0: (1.0, 0.0), 9: (1.0, 0.0), 10: (1.0, 0.0), 15: (1.5, 2.5), 20: (2.0, 5.0),
                      25: (2.5, 5.0), 30: (3.0, 5.0), 1000: (3.0, 5.0)}  # fmt: skip
    layer.num_batches_tracked.fill_(25)
    assert layer.limits() == (2.5, 5.0)  # the step count is the layer's own, saved with its weights
    assert "num_batches_tracked" in layer.state_dict()


@pytest.mark.parametrize("regime", ["warm-up (r = 1, d = 0)", "r and d clipped in every channel"])
def test_batch_renorm_gradient_by_gradcheck(regime: str) -> None:
    if regime.startswith("warm-up"):
        layer = renorm(warmup_steps=100)
    else:  # running σ far below and μ far from the batch's: r = r_max and |d| = d_max, constants near x
        layer = renorm()
        layer.running_std.fill_(0.01)
        layer.running_mean.fill_(-50.0)
    assert gradcheck(layer, channel_data(n=3))


def test_batch_renorm_holds_r_and_d_constant_in_backpropagation() -> None:
    """Where r and d are inside their bounds they depend on x; the paper treats them as constants."""
    layer = renorm(r_max=10.0, d_max=10.0).double()
    x = channel_data().double().requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad((layer.train()(x) * upstream).sum(), x)
    mu, sigma = torch.tensor([0.0, 3.0, -1.0, 0.5]).double(), torch.tensor([1.0, 0.2, 2.5, 1.1]).double()
    expected_y = batch_renorm_reference(x, mu, sigma, layer.weight, layer.bias, 10.0, 10.0)[0]
    (expected,) = torch.autograd.grad((expected_y * upstream).sum(), x)
    assert torch.allclose(grad, expected, atol=1e-10)

    def through_r_and_d(x):  # the same forward pass, differentiated through r and d too
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        std = (var + 1e-5).sqrt()
        r, d = std / sigma, (mean - mu) / sigma
        return (x - per_channel(mean)) / per_channel(std) * per_channel(r) + per_channel(d)

    (other,) = torch.autograd.grad((per_channel(layer.weight) * through_r_and_d(x) * upstream).sum(), x)
    assert not torch.allclose(grad, other, atol=1e-3)  # the test would see a layer that lets gradients through


# ------------------------------------------------------------------ FRN + TLU


def frn_reference(x, gamma, beta, tau, eps):
    """Singh & Krishnan 2020, Algorithm 1: ν² per sample and channel, x / sqrt(ν² + |ε|), TLU."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            nu2 = (x[i, c] ** 2).mean()
            y = gamma[c] * x[i, c] / torch.sqrt(nu2 + eps.abs()) + beta[c]
            out[i, c] = torch.maximum(y, tau[c])
    return out


def test_frn_tlu_is_the_papers_formula_with_a_learned_absolute_epsilon() -> None:
    layer = randomized(FilterResponseNormTLU2d(4, eps=1e-6))
    with torch.no_grad():
        layer.eps.fill_(-0.3)  # learned ε may go negative: the layer uses |ε|
    x = channel_data(n=3)
    y = layer(x)
    assert torch.allclose(y, frn_reference(x, layer.weight, layer.bias, layer.tau, layer.eps), atol=1e-5)
    clamped = y == per_channel(layer.tau).expand_as(y)
    assert clamped.any() and not clamped.all()  # the threshold is active for some responses only
    assert layer.eps.requires_grad and {n for n, _ in layer.named_parameters()} == {"weight", "bias", "tau", "eps"}


def test_frn_tlu_gradient_by_gradcheck() -> None:
    layer = randomized(FilterResponseNormTLU2d(4, eps=0.05))
    assert gradcheck(layer, channel_data(n=2))  # ε included: it is learned


# ------------------------------------------------------------------ EvoNorm-S0 / B0


def evonorm_s0_reference(x, v, gamma, beta, groups, eps=1e-5):
    """Liu et al. 2020, S0: x·σ(v·x) / sqrt(s²_{w,h,c/g}(x) + ε)·γ + β, the variance per sample and group."""
    out, size = torch.empty_like(x), x.shape[1] // groups
    for i in range(x.shape[0]):
        for g in range(groups):
            block = x[i, g * size : (g + 1) * size]
            std = torch.sqrt(((block - block.mean()) ** 2).mean() + eps)
            for k, c in enumerate(range(g * size, (g + 1) * size)):
                out[i, c] = block[k] * torch.sigmoid(v[c] * block[k]) / std * gamma[c] + beta[c]
    return out


def evonorm_b0_reference(x, v, gamma, beta, batch_var=None, eps=1e-5):
    """Liu et al. 2020, B0: x / max(sqrt(s²_{b,w,h}(x) + ε), v·x + sqrt(s²_{w,h}(x) + ε))·γ + β;
    ``batch_var`` replaces s²_{b,w,h} in evaluation (the running average)."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        var_b = ((x[:, c] - x[:, c].mean()) ** 2).mean() if batch_var is None else batch_var[c]
        for i in range(x.shape[0]):
            s = x[i, c]
            right = v[c] * s + torch.sqrt(((s - s.mean()) ** 2).mean() + eps)
            out[i, c] = s / torch.maximum(torch.sqrt(var_b + eps), right) * gamma[c] + beta[c]
    return out


def test_evonorm_s0_is_the_papers_formula() -> None:
    layer, x = randomized(EvoNorm2dS0(4, groups=2)), channel_data(n=3)
    assert torch.allclose(layer(x), evonorm_s0_reference(x, layer.v, layer.weight, layer.bias, groups=2), atol=1e-5)


def test_evonorm_b0_is_the_papers_formula_with_batch_variance_in_training_and_the_running_one_in_eval() -> None:
    layer, x = randomized(EvoNorm2dB0(4)), channel_data(n=6)
    y = layer.train()(x)
    assert torch.allclose(y, evonorm_b0_reference(x, layer.v, layer.weight, layer.bias), atol=1e-5)
    left = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    right = per_channel(layer.v) * x + torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert (per_channel(left) > right).any() and (per_channel(left) < right).any()  # both sides of max() occur
    n = x.numel() // x.shape[1]
    assert torch.allclose(layer.running_var, 0.9 + 0.1 * x.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1))
    layer.eval()
    expected = evonorm_b0_reference(x, layer.v, layer.weight, layer.bias, batch_var=layer.running_var)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: EvoNorm2dS0(4, groups=2), lambda: EvoNorm2dB0(4)], ids=["s0", "b0"])
def test_evonorm_gradient_by_gradcheck(make) -> None:
    assert gradcheck(randomized(make()), channel_data(n=3))


@pytest.mark.parametrize("ours,theirs", [("EvoNorm2dS0", "EvoNorm2dS0"), ("EvoNorm2dB0", "EvoNorm2dB0")])
def test_evonorms_agree_with_timms_in_float32(ours: str, theirs: str) -> None:
    """The same layer as timm's within float32 rounding, training step and evaluation."""
    timm_layers = pytest.importorskip("timm.layers", reason="timm is in normsweep's test extra")
    import normsweep.norms.layers as layers

    kwargs = {"groups": 2} if ours.endswith("S0") else {}
    mine = randomized(getattr(layers, ours)(4, **kwargs))
    other = getattr(timm_layers, theirs)(4, eps=1e-5, **kwargs)
    other.load_state_dict(mine.state_dict())
    x = channel_data(n=5)
    assert torch.allclose(mine.train()(x), other.train()(x), atol=1e-5)
    assert torch.allclose(mine.eval()(x), other.eval()(x), atol=1e-5)  # B0: the same running variance


# ------------------------------------------------------------------ every norm of the registry


def registry_layer(kind: str, channels: int = 8) -> torch.nn.Module:
    """One ``kind`` layer with its conf/norm/<kind>.yaml settings, as a model builds it."""
    cfg = make_cfg(f"norm={kind}", "norm.groups=4")
    return norm_layer(kind, cfg.norm.groups, **{k: getattr(cfg.norm, k) for k in NORMS[kind].options})(channels, "")


@pytest.mark.parametrize("kind", [k for k, norm in NORMS.items() if not norm.batch_statistics])
def test_batch_independent_norms_give_each_sample_the_same_output_whatever_the_batch(kind: str) -> None:
    torch.manual_seed(0)
    layer = randomized(registry_layer(kind)).train()
    x = torch.randn(6, 8, 5, 5)
    alone = layer(x[:1])
    assert torch.allclose(alone, layer(x)[:1], atol=1e-6)
    assert torch.allclose(alone, layer(torch.cat([x[:1], 100 * torch.randn(5, 8, 5, 5)]))[:1], atol=1e-6)


@pytest.mark.parametrize("kind", [k for k, norm in NORMS.items() if norm.batch_statistics])
def test_batch_statistics_norms_train_on_the_batch_and_evaluate_on_running_statistics(kind: str) -> None:
    torch.manual_seed(0)
    layer = randomized(registry_layer(kind)).train()
    x = torch.randn(6, 8, 5, 5) * 3 + 1
    assert not torch.allclose(layer(x[:2]), layer(x)[:2], atol=1e-3)  # training: the batch matters
    layer.eval()
    before = layer(x)
    assert torch.allclose(layer(x[:1]), before[:1], atol=1e-6)  # evaluation: one sample alone, same output
    layer.train()
    for _ in range(5):
        layer(torch.randn(6, 8, 5, 5) * 0.5 - 2)  # other data moves the running statistics
    assert not torch.allclose(layer.eval()(x), before, atol=1e-3)  # and evaluation follows them


@pytest.mark.parametrize("kind", ["batch_renorm", "frn", "evonorm_s0", "evonorm_b0"])
def test_training_resumed_with_each_new_norm_matches_an_uninterrupted_run(
    kind: str, folder_data: Path, cache_dir: Path, tmp_path: Path
) -> None:
    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20)
    schedule = ("norm.warmup_steps=2", "norm.r_max_steps=6", "norm.d_max_steps=5") if kind == "batch_renorm" else ()
    cfg = make_cfg(f"norm={kind}", "trainer.epochs=2", "augment=seed", *schedule, *TINY)  # BRN's bounds move mid-run

    assert_resume_matches_uninterrupted(cfg, splits, tmp_path)  # running statistics and BRN's step counts too
