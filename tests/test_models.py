"""The CNN family: exact parameter counts and what each norm layer does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsweep.models import StudyNet, build_model, count_params
from normsweep.norms import NORMS, norm_act, norm_layer
from normsweep.run.build import model_from_config

from .conftest import make_cfg

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


@pytest.mark.parametrize("arch", ["resnet", "study"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_every_norm_is_under_budget_and_classifies(norm: str, arch: str) -> None:
    model = model_from_config(make_cfg(f"norm={norm}", f"model={arch}", "norm.groups=2"))
    assert count_params(model) < 50_000
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_norms_with_a_third_parameter_per_channel_or_a_learned_eps_count_them() -> None:
    # 47,600 = 47,216 conv and head weights + 2 per normalized channel (16+24+24+36+36+56 = 192, in 6 layers)
    counts = {kind: count_params(model_from_config(make_cfg(f"norm={kind}"))) for kind in NORMS}
    assert counts["none"] == 47_216
    assert counts["batch"] == counts["batch_renorm"] == counts["group"] == counts["layer"] == 47_216 + 2 * 192
    assert counts["evonorm_s0"] == counts["evonorm_b0"] == 47_216 + 3 * 192  # gamma, beta, v
    assert counts["frn"] == 47_216 + 3 * 192 + 6  # gamma, beta, tau, and one learned eps per layer


@pytest.mark.parametrize("arch", ["resnet", "study"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_a_norm_that_is_also_an_activation_gets_no_relu_and_every_other_norm_one(norm: str, arch: str) -> None:
    model = model_from_config(make_cfg(f"norm={norm}", f"model={arch}", "norm.groups=2"))
    blocks = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) and isinstance(m[0], nn.Conv2d)
              and m[0].kernel_size == (3, 3)]  # fmt: skip
    assert len(blocks) == (6 if arch == "resnet" else 8)
    for block in blocks:
        kinds = [type(m) for m in block]
        relus = kinds.count(nn.ReLU)
        assert relus == (0 if NORMS[norm].activates else 1), (norm, kinds)
        if relus and arch == "study":  # the study's order: conv -> ReLU -> norm
            assert kinds[1] is nn.ReLU
        elif relus:  # normsweep's: conv -> [pool] -> norm -> ReLU
            assert kinds[-1] is nn.ReLU


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
        StudyNet(norm_act("group", groups=4), dropout=0.0)
    with pytest.raises(ValueError, match=r"stage2.down"):
        build_model("resnet", "group", groups=8, dropout=0.0, widths=[16, 24, 36, 56], depths=[1, 1, 0])
    with pytest.raises(
        ValueError, match=r"norm.groups=8 does not divide the 36 channels of layer 'stage2.down'; EvoNorm"
    ):
        build_model("resnet", "evonorm_s0", groups=8, dropout=0.0, widths=[16, 24, 36, 56], depths=[1, 1, 0])


def test_a_norms_own_settings_are_required_and_no_others_accepted() -> None:
    with pytest.raises(ValueError, match=r"norm=frn needs norm.eps \(conf/norm/frn.yaml sets it\)"):
        build_model("resnet", "frn", groups=4, dropout=0.0, **DEFAULT)
    with pytest.raises(ValueError, match=r"norm.eps is not a setting of norm=batch"):
        build_model("resnet", "batch", groups=4, dropout=0.0, **DEFAULT, norm_options={"eps": 1e-6})


def test_none_norm_has_no_normalization_layers() -> None:
    model = build_model("resnet", "none", groups=1, dropout=0.0, **DEFAULT)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    assert count_params(model) == count_params(build_model("resnet", "batch", groups=1, dropout=0.0, **DEFAULT)) - 384


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

    from normsweep.base.runtime import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory()
