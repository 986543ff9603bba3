"""swap_norms: every norm of the registry swapped into models normsweep did not build (torchvision's, hand-written)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from normsweep import swap_norms
from normsweep.base.errors import ConfigError
from normsweep.models.cnn import WSConv2d
from normsweep.models.swap import SwapReport
from normsweep.norms import NORMS, norm_layer

from .conftest import REPO

tv = pytest.importorskip("torchvision.models")


def options(kind: str) -> dict:
    """The norm's own settings as conf/norm/<kind>.yaml writes them (``eps`` for frn, batch_renorm's bounds)."""
    written = OmegaConf.load(REPO / "conf" / "norm" / f"{kind}.yaml")
    return {key: written[key] for key in NORMS[kind].options}


def tiny(classes: int = 10) -> nn.Sequential:
    """conv -> BN -> ReLU twice, then a head: the shape of most CNNs' blocks."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, classes),
    )  # fmt: skip


def count(model: nn.Module, *types: type) -> int:
    return sum(isinstance(m, types) for m in model.modules())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", list(NORMS))
def test_every_norm_swaps_in_trains_and_evaluates_deterministically(kind: str) -> None:
    torch.manual_seed(0)
    model = tiny()
    report = swap_norms(model, kind, groups=4, act="replace", **options(kind))
    assert report.replaced == {"BatchNorm2d": 2}
    new = type(norm_layer(kind, 4, **options(kind))(8))
    assert [type(model[i]) for i in (1, 4)] == [new, new]
    assert count(model, nn.ReLU) == (0 if NORMS[kind].activates else 2)  # the norm is the activation now
    assert report.activations == (("2", "5") if NORMS[kind].activates else ())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))
    assert report.params_after == params(model)


def test_torchvision_resnet18_gets_group_norm_everywhere() -> None:
    model = tv.resnet18(num_classes=10)
    before = params(model)
    report = swap_norms(model, "group", groups=32)
    assert report.replaced == {"BatchNorm2d": 20} and not count(model, nn.BatchNorm2d)
    assert count(model, nn.GroupNorm) == 20 and report.groups == {} and report.untouched == ()
    assert isinstance(model.layer2[0].downsample[1], nn.GroupNorm) and model.layer2[0].downsample[1].num_groups == 32
    assert report.params_before == report.params_after == before  # both have 2 parameters per channel
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert "replaced 20 BatchNorm2d" in str(report) and "params 11,181,642 -> 11,181,642" in str(report)


def test_a_norm_that_is_an_activation_is_refused_where_the_activation_is_forward_code() -> None:
    model = tv.resnet18(num_classes=10)
    with pytest.raises(ConfigError, match=r"would apply two: act='replace' replaces"):
        swap_norms(model, "frn", eps=1e-6)
    with pytest.raises(ConfigError, match=r"layer 'bn1' \(BatchNorm2d\) is not followed by an activation module"):
        swap_norms(model, "evonorm_b0", act="replace")
    assert count(model, nn.BatchNorm2d) == 20  # a refused swap changes nothing


def test_act_replace_replaces_the_relu_after_each_norm_and_refuses_a_norm_without_one() -> None:
    model = tiny()
    report = swap_norms(model, "evonorm_s0", groups=4, act="replace")
    assert [type(m).__name__ for m in model][:6] == ["Conv2d", "EvoNorm2dS0", "Identity"] * 2
    assert report.activations == ("2", "5") and "2 activations -> Identity" in str(report)
    no_act = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))  # e.g. a projection conv's norm
    with pytest.raises(ConfigError, match=r"layer '1' \(BatchNorm2d\) is not followed by an activation"):
        swap_norms(no_act, "frn", act="replace", eps=1e-6)
    assert swap_norms(no_act, "group", act="replace").replaced == {"BatchNorm2d": 1}  # act only matters for those


def test_mobilenet_group_counts_fall_back_to_a_divisor_or_fail_exactly() -> None:
    model = tv.mobilenet_v3_small(num_classes=10)
    n = count(model, nn.BatchNorm2d)
    with pytest.raises(ConfigError, match=r"norm.groups=32 does not divide the 16 channels of layer 'features.0.1'"):
        swap_norms(model, "group", groups=32, group_rule="exact")
    assert count(model, nn.BatchNorm2d) == n
    report = swap_norms(model, "group", groups=32)
    assert report.replaced == {"BatchNorm2d": n} and count(model, nn.GroupNorm) == n
    assert report.groups["features.0.1"] == (32, 16) and report.groups["features.1.block.2.1"] == (32, 16)
    for name, (asked, used) in report.groups.items():
        layer = model.get_submodule(name)
        assert layer.num_groups == used and layer.num_channels % used == 0 and used < asked
        assert not any(layer.num_channels % g == 0 for g in range(used + 1, asked + 1))  # the largest such divisor
    unchanged = [m for name, m in model.named_modules() if isinstance(m, nn.GroupNorm) and name not in report.groups]
    assert unchanged and all(m.num_groups == 32 for m in unchanged)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert "groups features.0.1 32->16" in str(report)


def test_convnext_channels_first_layer_norms_are_swapped_and_token_layer_norms_kept() -> None:
    from torchvision.models.convnext import LayerNorm2d

    model = tv.convnext_tiny(num_classes=10)
    report = swap_norms(model, "layer")
    assert report.replaced == {"LayerNorm2d": 5} and not count(model, LayerNorm2d)
    assert isinstance(model.features[2][0], nn.GroupNorm) and model.features[2][0].num_channels == 96
    assert len(report.untouched) == 18 and {cls for _, cls in report.untouched} == {"LayerNorm"}
    assert count(model, nn.LayerNorm) == 18  # the blocks' channels-last norms
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class Tokens(nn.Module):
    """A patch embedding, a token norm and a head with BatchNorm1d, around containers of feature-map norms."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.BatchNorm2d(8)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, nn.ReLU())
        self.again = shared  # the same layer registered twice
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU()),
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.GELU()),
            ]
        )
        self.by_name = nn.ModuleDict({"sync": nn.SyncBatchNorm(8), "tokens": nn.LayerNorm(8)})
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[1](self.blocks[0](self.stem(x)))
        tokens = self.by_name["tokens"](x.flatten(2).transpose(1, 2))  # (N, HW, C)
        return self.head(tokens.mean(1))


def test_a_hand_written_model_keeps_its_token_and_head_norms() -> None:
    model = Tokens()
    report = swap_norms(model, "group", groups=4)
    assert report.replaced == {"BatchNorm2d": 1, "GroupNorm": 1, "InstanceNorm2d": 1, "SyncBatchNorm": 1}
    assert report.untouched == (("by_name.tokens", "LayerNorm"), ("head.1", "BatchNorm1d"))
    assert model.again is model.stem[1] and isinstance(model.again, nn.GroupNorm)  # still one layer
    assert isinstance(model.by_name["sync"], nn.GroupNorm) and model.blocks[0][1].num_groups == 4
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert "untouched by_name.tokens (LayerNorm), head.1 (BatchNorm1d)" in str(report)


def test_new_layers_take_the_old_ones_device_dtype_and_mode() -> None:
    model = tiny()
    model[1] = nn.InstanceNorm2d(8)  # no tensors of its own: the model's dtype
    model.to(torch.float64).eval()
    swap_norms(model, "batch_renorm", **options("batch_renorm"))
    assert all(p.dtype == torch.float64 for p in model.parameters()) and not model[1].training
    assert model[4].running_mean.dtype == torch.float64 and model[4].num_batches_tracked.dtype == torch.long
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_ws_standardizes_the_convs_that_feed_a_swapped_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # one weight per filter: kept
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 10, 1),  # feeds no norm
    )  # fmt: skip
    state, before = {k: v.clone() for k, v in model.state_dict().items()}, params(model)
    report = swap_norms(model, "group", groups=4, ws=True)
    assert report.standardized == ("0", "7") and "2 convs weight-standardized" in str(report)
    assert [type(model[i]) for i in (0, 4, 7, 10)] == [WSConv2d, nn.Conv2d, WSConv2d, nn.Conv2d]
    assert report.params_after == before == params(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if k.startswith(("0.", "7.")))
    conv, x = model[7], torch.randn(2, 8, 8, 8)
    w, var = conv.standardized_weight(), conv.weight.var((1, 2, 3), unbiased=False)
    assert torch.allclose(w.mean((1, 2, 3)), torch.zeros(16), atol=1e-6)
    assert torch.allclose(w.var((1, 2, 3), unbiased=False), var / (var + WSConv2d.eps))  # unit variance but for eps
    assert torch.allclose(conv(x), F.conv2d(x, w, conv.bias, padding=1), atol=1e-5)
    model(torch.randn(2, 3, 16, 16)).sum().backward()


def test_a_swapped_models_state_dict_loads_into_a_fresh_swap() -> None:
    torch.manual_seed(0)
    trained = tiny()
    swap_norms(trained, "evonorm_b0", act="replace", ws=True)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    trained(torch.randn(4, 3, 16, 16)).sum().backward()  # moves weights and running statistics
    opt.step()
    torch.manual_seed(1)
    fresh = tiny()
    swap_norms(fresh, "evonorm_b0", act="replace", ws=True)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_a_batch_independent_norm_trains_on_one_sample_where_batch_norm_cannot() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.randn(1, 3, 8, 8))
    swap_norms(model, "group", groups=4)
    model(torch.randn(1, 3, 8, 8)).sum().backward()


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="norm.kind='weight' is unknown"):
        swap_norms(tiny(), "weight")
    with pytest.raises(ConfigError, match=r"norm=frn needs norm.eps"):
        swap_norms(tiny(), "frn", act="replace")
    with pytest.raises(ConfigError, match="group_rule='largest'"):
        swap_norms(tiny(), "group", group_rule="largest")
    with pytest.raises(ConfigError, match="itself a BatchNorm2d"):
        swap_norms(nn.BatchNorm2d(4), "group")
    report = swap_norms(nn.Sequential(nn.Linear(2, 2)), "group")  # nothing to swap: an empty report
    assert isinstance(report, SwapReport) and report.replaced == {} and "replaced nothing" in str(report)
