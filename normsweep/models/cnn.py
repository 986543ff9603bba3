"""normsweep's own CNN family. Models take a norm-act callable ``norm(channels, where, act_first=False)``
(``norms.norm_act``) and place what it returns after each conv that feeds a norm: the norm and its
ReLU, or one layer that is both (FRN + TLU, EvoNorm; no ReLU around them). ``norms.norm_act`` is
the one place that decides whether a ReLU goes with a norm; the models below never name a norm.

Two members:

* ``study``  - the published study's network, C1 C2 c3 P1 C4 C5 C6 c7 P2 C8 C9 C10 GAP c11,
  37,098 parameters with any norm of two parameters per channel (conv -> ReLU -> norm -> dropout;
  the norm-act layers replace ReLU -> norm).
* ``resnet`` - normsweep's default: a small residual network that spends its parameters at
  low resolution (conv -> pool -> norm -> ReLU stages, one residual block per stage; the norm-act
  layers replace norm -> ReLU), so it is both more accurate and cheaper per image than ``study``
  while staying under 50,000 parameters for every norm.

With ``ws`` (``norm.ws``) every 3x3 conv that feeds a norm is weight-standardized (:class:`WSConv2d`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normsweep.base.errors import ConfigError
from normsweep.norms import NormAct


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from 64-bit random words split into four 16-bit draws.

    On CPU, ``bernoulli_`` (one Mersenne-Twister draw per element) took about 35% of a training
    step of the study's network, which has dropout after every conv; a quarter of the draws makes
    the mask about 3x cheaper. Each element is kept with probability 1 - k/65536,
    k = round(p * 65536) (within 1e-5 of 1 - p), and scaled by the inverse of that probability,
    so the expected output equals the input as with ``nn.Dropout``. Same parameters, same eval
    behaviour; the torch RNG drives it, so seeds and resumes reproduce it.
    """

    cheap_cpu_mask = True  # False: nn.Dropout's own mask (normsweep.run.packed turns it off under torch.func.vmap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.cheap_cpu_mask and self.training and 0 < self.p < 1 and x.device.type == "cpu" and _dense(x)):
            return super().forward(x)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        draws = words.view(torch.int16)[:n].as_strided(x.shape, x.stride())  # uniform over all int16
        drop = round(self.p * 65536)
        return torch.where(draws >= drop - 32768, x * (65536 / (65536 - drop)), 0)


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out densely (contiguous or channels-last)."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (Qiao et al. 2019, arXiv:1903.10520).

    Each output channel's filter is standardized to zero mean and unit variance over its
    (in_channels, kH, kW) weights before the convolution. No parameters are added; the stored
    weight stays the trained parameter, the effective one is :meth:`standardized_weight`. It smooths
    the loss landscape for norms that do not use batch statistics (GroupNorm, LayerNorm), which is
    the known way to bring them up to BatchNorm. Only for convs that feed a norm layer: the norm
    absorbs the scale the standardization removes.
    """

    eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight.float()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return ((w - mean) * torch.rsqrt(var + self.eps)).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def conv3x3(c_in: int, c_out: int, ws: bool) -> nn.Conv2d:
    """A bias-free 3x3 conv feeding a norm layer, weight-standardized when ``ws`` (``norm.ws``)."""
    return (WSConv2d if ws else nn.Conv2d)(c_in, c_out, 3, padding=1, bias=False)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ConvNormAct(nn.Sequential):
    """3x3 conv (no bias) -> [maxpool] -> norm -> ReLU (or the one norm-act layer)."""

    def __init__(self, c_in: int, c_out: int, norm: NormAct, where: str, pool: bool = False, ws: bool = False):
        layers: list[nn.Module] = [conv3x3(c_in, c_out, ws)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += norm(c_out, where)
        super().__init__(*layers)


class ResidualStage(nn.Module):
    """conv -> pool -> norm -> ReLU, then an optional residual block of ``depth`` convs."""

    def __init__(self, c_in: int, c_out: int, depth: int, norm: NormAct, dropout: float, name: str, ws: bool = False):
        super().__init__()
        self.down = ConvNormAct(c_in, c_out, norm, f"{name}.down", pool=True, ws=ws)
        self.res = nn.Sequential(*[ConvNormAct(c_out, c_out, norm, f"{name}.res{i}", ws=ws) for i in range(depth)])
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
        norm: NormAct,
        dropout: float,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int = 10,
        ws: bool = False,
    ):
        super().__init__()
        if len(widths) != len(depths) + 1:
            raise ConfigError(
                f"model.widths has {len(widths)} entries and model.depths {len(depths)}; "
                f"widths needs one more (the stem) than depths (one per stage)"
            )
        self.stem = ConvNormAct(3, widths[0], norm, "stem", ws=ws)
        self.stages = nn.Sequential(
            *[
                ResidualStage(widths[i], widths[i + 1], depths[i], norm, dropout, f"stage{i + 1}", ws)
                for i in range(len(depths))
            ]
        )
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class StudyNet(nn.Module):
    """The study's network: C1 C2 c3 P1 C4 C5 C6 c7 P2 C8 C9 C10 GAP c11 (37,098 parameters).

    3x3 blocks are conv -> ReLU -> norm -> dropout (conv -> norm-act layer -> dropout for FRN + TLU
    and EvoNorm); c3, c7 are 1x1 transitions; c11 is the 1x1
    classifier after global average pooling. No biases.
    """

    def __init__(self, norm: NormAct, dropout: float, num_classes: int = 10, ws: bool = False):
        super().__init__()

        def block(c_in: int, c_out: int, where: str) -> nn.Sequential:
            return nn.Sequential(conv3x3(c_in, c_out, ws), *norm(c_out, where, act_first=True), Dropout(dropout))

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
