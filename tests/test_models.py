"""The CNN family: exact parameter counts and what each norm layer does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsweep.models import StudyNet, build_model, count_params
from normsweep.norms import norm_layer

DEFAULT = dict(widths=[16, 24, 36, 56], depths=[1, 1, 0])


def make_norm(kind: str, channels: int, groups: int = 1, where: str = "") -> nn.Module:
    """One ``kind`` norm layer for a feature map with ``channels`` channels, as a model builds it."""
    return norm_layer(kind, groups)(channels, where)


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "instance"])
def test_study_network_has_37098_parameters_with_every_affine_norm(norm: str) -> None:
    assert count_params(build_model("study", norm, groups=2, dropout=0.02)) == 37_098


def test_study_network_without_norm_has_only_its_conv_weights() -> None:
    # 37,098 minus the norms' affine parameters: 2 * (10+10+24+16+32+32+32+32) = 376
    assert count_params(build_model("study", "none", groups=2, dropout=0.02)) == 37_098 - 376


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "instance", "none"])
def test_default_network_is_under_budget_and_classifies(norm: str) -> None:
    model = build_model("resnet", norm, groups=4, dropout=0.0, **DEFAULT)
    assert count_params(model) < 50_000
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_default_network_parameter_count() -> None:
    # conv weights 432+3456+5184+7776+11664+18144, head 560, norm affines 2*(16+24+24+36+36+56)
    assert count_params(build_model("resnet", "batch", groups=4, dropout=0.0, **DEFAULT)) == 47_600


def test_batch_norm_uses_batch_statistics_in_train_and_running_statistics_in_eval() -> None:
    torch.manual_seed(0)
    bn = make_norm("batch", 3, groups=1)
    x = torch.randn(16, 3, 8, 8) * 5 + 2
    y = bn.train()(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)  # batch statistics
    assert not torch.allclose(bn.running_mean, torch.zeros(3))  # running stats updated
    bn.eval()
    expected = (x - bn.running_mean.view(1, 3, 1, 1)) / torch.sqrt(bn.running_var.view(1, 3, 1, 1) + bn.eps)
    assert torch.allclose(bn(x), expected, atol=1e-5)
    # In train mode one sample's output depends on the rest of the batch; in eval it does not.
    assert torch.allclose(bn(x[:1]), bn(x)[:1], atol=1e-6)
    bn.train()
    assert not torch.allclose(bn(x[:2]), bn(x)[:2], atol=1e-3)


@pytest.mark.parametrize("norm", ["group", "layer", "instance"])
def test_group_layer_instance_norm_outputs_do_not_depend_on_other_samples(norm: str) -> None:
    torch.manual_seed(0)
    layer = make_norm(norm, 8, groups=4).train()
    x = torch.randn(6, 8, 5, 5)
    alone = layer(x[:1])
    in_batch = layer(x)[:1]
    other_batch = layer(torch.cat([x[:1], 100 * torch.randn(5, 8, 5, 5)]))[:1]
    assert torch.allclose(alone, in_batch, atol=1e-6) and torch.allclose(alone, other_batch, atol=1e-6)


def test_layer_norm_normalizes_each_sample_over_channels_and_pixels_with_per_channel_affine() -> None:
    ln = make_norm("layer", 10, groups=4)
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1
    assert count_params(ln) == 2 * 10  # not 2*C*H*W as nn.LayerNorm([C, H, W]) would have
    x = torch.randn(3, 10, 6, 6) * 3 + 1
    y = ln(x)
    assert torch.allclose(y.mean((1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var((1, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    ref = nn.functional.layer_norm(x, x.shape[1:])  # LayerNorm([C,H,W]) without its affine
    assert torch.allclose(y, ref, atol=1e-5)


def test_group_norm_normalizes_each_group_separately() -> None:
    gn = make_norm("group", 8, groups=4)
    y = gn(torch.randn(2, 8, 4, 4) * 7)
    per_group = y.view(2, 4, 2 * 16)
    assert torch.allclose(per_group.mean(-1), torch.zeros(2, 4), atol=1e-5)


def test_group_count_that_does_not_divide_a_layer_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"norm.groups=4 does not divide the 10 channels of layer 'C1'"):
        StudyNet(norm_layer("group", groups=4), dropout=0.0)
    with pytest.raises(ValueError, match=r"stage2.down"):
        build_model("resnet", "group", groups=8, dropout=0.0, widths=[16, 24, 36, 56], depths=[1, 1, 0])


def test_none_norm_has_no_normalization_layers() -> None:
    model = build_model("resnet", "none", groups=1, dropout=0.0, **DEFAULT)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())


def test_unknown_arch_and_norm_are_rejected() -> None:
    with pytest.raises(ValueError, match="model.arch"):
        build_model("vgg", "batch", 1, 0.0)
    with pytest.raises(ValueError, match="norm.kind"):
        make_norm("weight", 4, 1)


def test_widths_and_depths_must_match() -> None:
    with pytest.raises(ValueError, match="model.widths has 3 entries and model.depths 3"):
        build_model("resnet", "batch", 1, 0.0, widths=[8, 16, 32], depths=[1, 1, 1])


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_dropout_drops_with_probability_p_and_keeps_the_expectation(channels_last: bool) -> None:
    from normsweep.models import Dropout

    drop = Dropout(0.02)
    x = torch.rand(64, 16, 32, 32) + 0.5  # no zeros of its own
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.02) < 0.001  # 1M elements: std of the rate ~1.4e-4
    scale = 65536 / (65536 - round(0.02 * 65536))
    assert torch.allclose(y[kept], x[kept] * scale)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * scale)  # gradient flows through kept elements only
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the torch RNG drives it: same seed, same mask
    masks = kept.flatten(1).float().mean(1)
    assert masks.std() > 0  # per-element, not one mask for all
    drop.eval()
    assert drop(x) is x or torch.equal(drop(x), x)


def test_keep_freed_memory_applies_on_glibc() -> None:
    import platform

    from normsweep.runtime import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory()
