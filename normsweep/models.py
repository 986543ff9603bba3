"""The CNN family. Where the normalization layer is chosen: :func:`make_norm`.

Two members:

* ``study``  - the published study's network, C1 C2 c3 P1 C4 C5 C6 c7 P2 C8 C9 C10 GAP c11,
  37,098 parameters with any affine norm (conv -> ReLU -> norm -> dropout).
* ``resnet`` - normsweep's default: a small residual network that spends its parameters at
  low resolution (conv -> pool -> norm -> ReLU stages, one residual block per stage), so it
  is both more accurate and cheaper per image than ``study`` while staying under 50,000
  parameters for every norm.

Layer Normalization for conv feature maps is ``GroupNorm(1, C)``: it normalizes each sample over
(C, H, W) and learns one scale and shift per channel. ``nn.LayerNorm([C, H, W])`` would learn a
scale and shift per *pixel* (2*C*H*W parameters: 20,480 for a 10x32x32 map) and blow the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import ConfigError

NORMS = ("batch", "group", "layer", "instance", "none")


def make_norm(kind: str, channels: int, groups: int, where: str = "") -> nn.Module:
    """The normalization layer for a conv feature map with ``channels`` channels.

    ``where`` names the layer in error messages (e.g. ``"stage2.conv"``).
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        if groups < 1 or channels % groups:
            raise ConfigError(
                f"norm.groups={groups} does not divide the {channels} channels of layer {where!r}; "
                f"GroupNorm needs a group count that divides every layer's channels "
                f"(choose one of {_divisors(channels)} for this layer, or change model widths)"
            )
        return nn.GroupNorm(groups, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C,H,W), per-channel affine
    if kind == "instance":
        return nn.GroupNorm(channels, channels)  # InstanceNorm with per-channel affine
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm.kind={kind!r} is unknown; expected one of {NORMS}")


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from 64-bit random words split into four 16-bit draws.

    On CPU, ``bernoulli_`` (one Mersenne-Twister draw per element) took about 35% of a training
    step of the study's network, which has dropout after every conv; a quarter of the draws makes
    the mask about 3x cheaper. Each element is kept with probability 1 - k/65536,
    k = round(p * 65536) (within 1e-5 of 1 - p), and scaled by the inverse of that probability,
    so the expected output equals the input as with ``nn.Dropout``. Same parameters, same eval
    behaviour; the torch RNG drives it, so seeds and resumes reproduce it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or not dense:
            return super().forward(x)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        draws = words.view(torch.int16)[:n].as_strided(x.shape, x.stride())  # uniform over all int16
        drop = round(self.p * 65536)
        return torch.where(draws >= drop - 32768, x * (65536 / (65536 - drop)), 0)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ConvNormAct(nn.Sequential):
    """3x3 conv (no bias) -> [maxpool] -> norm -> ReLU."""

    def __init__(self, c_in: int, c_out: int, norm: str, groups: int, where: str, pool: bool = False):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [make_norm(norm, c_out, groups, where), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class ResidualStage(nn.Module):
    """conv -> pool -> norm -> ReLU, then an optional residual block of ``depth`` convs."""

    def __init__(self, c_in: int, c_out: int, depth: int, norm: str, groups: int, dropout: float, name: str):
        super().__init__()
        self.down = ConvNormAct(c_in, c_out, norm, groups, f"{name}.down", pool=True)
        self.res = nn.Sequential(
            *[ConvNormAct(c_out, c_out, norm, groups, f"{name}.res{i}") for i in range(depth)]
        )
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        if len(self.res):
            x = x + self.res(x)
        return self.drop(x)


class ResNet(nn.Module):
    """normsweep's default network: a stem at full resolution, then pooled residual stages."""

    def __init__(
        self,
        norm: str,
        groups: int,
        dropout: float,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int = 10,
    ):
        super().__init__()
        if len(widths) != len(depths) + 1:
            raise ConfigError(
                f"model.widths has {len(widths)} entries and model.depths {len(depths)}; "
                f"widths needs one more (the stem) than depths (one per stage)"
            )
        self.stem = ConvNormAct(3, widths[0], norm, groups, "stem")
        self.stages = nn.Sequential(
            *[
                ResidualStage(widths[i], widths[i + 1], depths[i], norm, groups, dropout, f"stage{i + 1}")
                for i in range(len(depths))
            ]
        )
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class StudyNet(nn.Module):
    """The study's network: C1 C2 c3 P1 C4 C5 C6 c7 P2 C8 C9 C10 GAP c11 (37,098 parameters).

    3x3 blocks are conv -> ReLU -> norm -> dropout; c3, c7 are 1x1 transitions; c11 is the 1x1
    classifier after global average pooling. No biases.
    """

    def __init__(self, norm: str, groups: int, dropout: float, num_classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int, where: str) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.ReLU(inplace=True),
                make_norm(norm, c_out, groups, where),
                Dropout(dropout),
            )

        def transition(c_in: int, c_out: int) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, 1, bias=False)

        self.features = nn.Sequential(
            block(3, 10, "C1"), block(10, 10, "C2"), transition(10, 16), nn.MaxPool2d(2),
            block(16, 24, "C4"), block(24, 16, "C5"), block(16, 32, "C6"), transition(32, 16), nn.MaxPool2d(2),
            block(16, 32, "C8"), block(32, 32, "C9"), block(32, 32, "C10"),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), transition(32, num_classes), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHS = ("study", "resnet")


def build_model(
    arch: str,
    norm: str,
    groups: int,
    dropout: float,
    widths: Sequence[int] = (),
    depths: Sequence[int] = (),
    num_classes: int = 10,
) -> nn.Module:
    """The network named by ``model.arch`` with the norm named by ``norm.kind``."""
    if arch == "study":
        return StudyNet(norm, groups, dropout, num_classes)
    if arch == "resnet":
        return ResNet(norm, groups, dropout, widths, depths, num_classes)
    raise ConfigError(f"model.arch={arch!r} is unknown; expected one of {ARCHS}")
